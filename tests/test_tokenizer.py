"""Tokenizers, tokenizer loading and the record -> model input path shared by training and eval."""

import importlib.util
import json

import pytest

from megatron_longact.config import ConfigError
from megatron_longact.data.tokenizer import (
    ByteTokenizer,
    PromptConfig,
    Tokenizer,
    TokenizerConfig,
    build_model_input,
    encode_completion,
    encode_prompt_text,
    load_tokenizer,
    render_jinja_chat_template,
    render_prompt,
)

RECORD = {"prompt": "Context here.\nWhat is the number?", "answer_prefix": "Answer:"}


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 263
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    text = "caf\u00e9 \u2603 plain ASCII"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    ids = tok.encode("<|user|>hi<|end|>")
    assert ids == [260, ord("h"), ord("i"), 262]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|user|>hi<|end|>"
    # An invalid UTF-8 run (a model can emit one) decodes with a replacement character, not an error.
    assert tok.decode([0xE2, 0x98]) == "\ufffd"
    with pytest.raises(ValueError, match="outside the byte tokenizer's vocabulary"):
        tok.decode([999])


def test_byte_chat_template():
    tok = ByteTokenizer()
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|system|>S<|end|>\n<|user|>U<|end|>\n<|assistant|>"
    with pytest.raises(ValueError, match="messages\\[0\\].role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_render_prompt_modes():
    tok = ByteTokenizer()
    raw = render_prompt(RECORD, tok, PromptConfig(chat="none"))
    assert raw == "Context here.\nWhat is the number?\nAnswer:"
    chat = render_prompt(RECORD, tok, PromptConfig(chat="auto"))
    assert chat == "<|user|>Context here.\nWhat is the number?<|end|>\n<|assistant|>Answer:"
    assert render_prompt(RECORD, tok, PromptConfig(chat="template")) == chat
    with_system = render_prompt(RECORD, tok, PromptConfig(system_prompt="Be brief."))
    assert with_system.startswith("<|system|>Be brief.<|end|>\n<|user|>")
    # Without a tokenizer only raw rendering is possible; "auto" falls back, "template" refuses.
    assert render_prompt(RECORD, None, PromptConfig(chat="auto")) == raw
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt(RECORD, None, PromptConfig(chat="template"))


def test_build_model_input_adds_bos_once_and_completion_ends_with_eos():
    tok = ByteTokenizer()
    inp = build_model_input(RECORD, tok)
    assert inp.ids[0] == tok.bos_id and inp.ids[1] == 260
    assert tok.decode(inp.ids, skip_special_tokens=False) == "<|bos|>" + inp.text
    # A rendered text that already starts with BOS (Llama-style templates) gets no second one.
    again = encode_prompt_text("<|bos|>hello", tok)
    assert again.count(tok.bos_id) == 1
    assert encode_prompt_text("hello", tok, PromptConfig(add_bos=False))[0] == ord("h")
    assert encode_completion(" 42", tok) == [ord(" "), ord("4"), ord("2"), tok.eos_id]


def test_config_validation():
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        TokenizerConfig(kind="sentencepiece")
    with pytest.raises(ConfigError, match="tokenizer.path: required"):
        TokenizerConfig(kind="hf")
    with pytest.raises(ConfigError, match="prompt.chat"):
        PromptConfig(chat="always")
    assert isinstance(load_tokenizer(TokenizerConfig()), ByteTokenizer)


def test_hf_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "missing")))
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="needs the 'transformers' package"):
            load_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(TokenizerConfig(kind="tokenizers", path=str(tmp_path)))


QWEN_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_jinja_chat_template_rendering():
    text = render_jinja_chat_template(
        QWEN_LIKE_TEMPLATE, [{"role": "user", "content": "hi"}], add_generation_prompt=True, special_tokens={}
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizers_json_backend(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4, "hi": 5, "Answer": 6,
             ":": 7, "\n": 8}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    split_lines = pre_tokenizers.Split("\n", "isolated")
    tk.pre_tokenizer = pre_tokenizers.Sequence([split_lines, pre_tokenizers.Whitespace()])
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": QWEN_LIKE_TEMPLATE}))
    tok = load_tokenizer(TokenizerConfig(kind="tokenizers", path=str(tmp_path)))
    assert tok.eos_id == 2 and tok.pad_id == 2 and tok.bos_id is None
    inp = build_model_input({"prompt": "hi", "answer_prefix": "Answer:"}, tok)
    assert inp.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nAnswer:"
    assert inp.ids[:2] == [1, 3] and inp.ids[-2:] == [6, 7]
