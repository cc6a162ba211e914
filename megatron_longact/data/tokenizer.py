"""Tokenizers and the one function that turns a task record into model input.

Three back ends share the ``Tokenizer`` protocol:

- ``ByteTokenizer``: 256 byte ids plus a handful of special tokens, for the tiny CPU models. It needs
  no files, so tests and demos run anywhere.
- ``HFTokenizer``: ``transformers.AutoTokenizer`` loaded from a local directory (never from the hub).
  ``transformers`` is imported only when this back end is asked for.
- ``TokenizersJsonTokenizer``: the ``tokenizers`` package reading a local ``tokenizer.json``; the chat
  template and special tokens come from the ``tokenizer_config.json`` next to it when there is one.

``encode`` never adds BOS/EOS by itself and always recognises special-token strings in the text (as a
Hugging Face tokenizer does for its added tokens), so a rendered chat template encodes to the same ids
whichever back end produced it. BOS is added in one place only: ``encode_prompt_text``.

``render_prompt`` / ``build_model_input`` are the single path from a task record to model input.
Training (RL rollouts, SFT) and evaluation both call them, so a model never sees a prompt format at
evaluation time that it was not trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

from megatron_longact.config import ConfigError, check_choice

Message = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the library needs from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings map to their ids; no BOS/EOS is added."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` special tokens are dropped."""

    @property
    def has_chat_template(self) -> bool:
        """Whether ``apply_chat_template`` can be called."""

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) as text, not ids."""


# --------------------------------------------------------------------------------------------------
# Byte-level tokenizer


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then special tokens.

    Ids: 256 ``<|pad|>``, 257 ``<|bos|>``, 258 ``<|eos|>``, 259 ``<|system|>``, 260 ``<|user|>``,
    261 ``<|assistant|>``, 262 ``<|end|>``; ``vocab_size`` is 263. Role markers are single tokens so
    that a tiny model spends no capacity learning to spell them.

    Chat template: ``<|system|>S<|end|>\\n<|user|>U<|end|>\\n<|assistant|>`` (system turn only when
    given); an assistant turn is closed by EOS, which is what generation stops on.
    """

    SPECIAL_TOKENS = (
        "<|pad|>",
        "<|bos|>",
        "<|eos|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    )

    def __init__(self) -> None:
        self.name = "byte"
        self.special_to_id = {tok: 256 + i for i, tok in enumerate(self.SPECIAL_TOKENS)}
        self.id_to_special = {i: tok for tok, i in self.special_to_id.items()}
        self.vocab_size = 256 + len(self.SPECIAL_TOKENS)
        self.pad_id = self.special_to_id["<|pad|>"]
        self.bos_id: int | None = self.special_to_id["<|bos|>"]
        self.eos_id = self.special_to_id["<|eos|>"]
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self.special_to_id.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self.id_to_special:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            # A byte run may end mid-character when a model emits an invalid sequence; "replace"
            # keeps decoding total instead of raising in the middle of an evaluation.
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.id_to_special[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    @property
    def has_chat_template(self) -> bool:
        return True

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        parts = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ("system", "user", "assistant"):
                raise ValueError(
                    f"messages[{i}].role: got {role!r}, expected one of ['assistant', 'system', 'user']"
                )
            content = message.get("content", "")
            close = "<|eos|>" if role == "assistant" else "<|end|>"
            parts.append(f"<|{role}|>{content}{close}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizers from local files


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer so that it follows the ``Tokenizer`` protocol."""

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        self.tok = hf_tokenizer
        self.name = name
        self.vocab_size = len(hf_tokenizer)
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name} defines no eos_token; set one in its tokenizer_config.json")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        # Many causal LMs ship without a pad token; padding positions are masked anyway, so EOS is a
        # safe stand-in.
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = hf_tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.has_chat_template:
            raise ValueError(
                f"tokenizer {self.name} has no chat template; use prompt.chat='none' or 'auto'"
            )
        return self.tok.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class TokenizersJsonTokenizer:
    """A ``tokenizers.Tokenizer`` read from a local ``tokenizer.json``.

    Special tokens and the chat template are taken from ``tokenizer_config.json`` in the same
    directory when it exists (the layout of a Hugging Face model directory). The template is rendered
    with jinja2 the way ``transformers`` renders it (sandboxed, ``trim_blocks``, ``lstrip_blocks``,
    ``raise_exception`` available), which covers the templates of the common model families.
    """

    def __init__(self, tokenizer_json: Path, *, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        try:
            import tokenizers
        except ImportError:
            raise ImportError(
                "tokenizer.kind='tokenizers' needs the 'tokenizers' package, which is not installed; "
                "install it with `pip install tokenizers`"
            ) from None
        self.tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        self.name = str(tokenizer_json.parent)
        config_path = tokenizer_json.parent / "tokenizer_config.json"
        config: dict = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        self.special_tokens = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        for key, override in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
            if override is not None:
                self.special_tokens[key] = override
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

        eos = self._id_of("eos_token")
        if eos is None:
            raise ValueError(
                f"{tokenizer_json}: no eos_token found; name one in tokenizer_config.json or pass "
                "tokenizer.eos_token"
            )
        self.eos_id = eos
        pad = self._id_of("pad_token")
        self.pad_id = pad if pad is not None else eos
        self.bos_id = self._id_of("bos_token")

    def _id_of(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        token_id = self.tok.token_to_id(text)
        if token_id is None:
            raise ValueError(f"{self.name}: {key} {text!r} is not in the vocabulary of tokenizer.json")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.name} has no chat_template in tokenizer_config.json; "
                "use prompt.chat='none' or 'auto'"
            )
        return render_jinja_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens={k: v for k, v in self.special_tokens.items() if v is not None},
            **kwargs,
        )


def render_jinja_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    **kwargs: Any,
) -> str:
    """Render a Hugging Face chat template with the environment ``transformers`` uses."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    compiled = env.from_string(template)
    return compiled.render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        **dict(special_tokens),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class TokenizerConfig:
    """Which tokenizer to use."""

    kind: Literal["byte", "hf", "tokenizers"] = "byte"
    """``byte``: built-in byte-level tokenizer (tiny models); ``hf``: transformers.AutoTokenizer from a
    local directory; ``tokenizers``: the tokenizers package from a local tokenizer.json."""
    path: str | None = None
    """Local directory (``hf``), or tokenizer.json / its directory (``tokenizers``). Never a hub name:
    nothing is downloaded."""
    trust_remote_code: bool = False
    """Passed to AutoTokenizer for tokenizers that ship their own Python code (``hf`` only)."""
    eos_token: str | None = None
    """Override of the EOS token string (``tokenizers`` only), for a directory without a config."""

    def __post_init__(self) -> None:
        check_choice("tokenizer.kind", self.kind, ("byte", "hf", "tokenizers"))
        if self.kind != "byte" and not self.path:
            raise ConfigError(f"tokenizer.path: required when tokenizer.kind is {self.kind!r}")


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Build the tokenizer ``cfg`` names, from local files only."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    path = Path(cfg.path).expanduser()
    if cfg.kind == "hf":
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer.path {path} is not a directory; kind='hf' needs a local model or tokenizer "
                "directory (hub names cannot be downloaded here)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(
                "tokenizer.kind='hf' needs the 'transformers' package, which is not installed; install "
                "it (`pip install transformers`) or use tokenizer.kind='tokenizers' with the directory's "
                "tokenizer.json"
            ) from None
        hf = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        return HFTokenizer(hf, name=str(path))
    # kind == "tokenizers"
    tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"tokenizer.path {cfg.path}: no tokenizer.json found (looked for {tokenizer_json})"
        )
    return TokenizersJsonTokenizer(tokenizer_json, eos_token=cfg.eos_token)


# --------------------------------------------------------------------------------------------------
# Task record -> model input


@dataclass
class PromptConfig:
    """How a task record becomes model input. Use the same values for training and evaluation."""

    chat: Literal["auto", "template", "none"] = "auto"
    """``template``: wrap the prompt as a user turn with the tokenizer's chat template (error if it has
    none); ``none``: raw text ``prompt + "\\n" + answer_prefix`` (base models); ``auto``: the template
    when the tokenizer has one, else raw."""
    system_prompt: str | None = None
    """Optional system turn (chat modes only)."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS id when it has one and the rendered text does not already start
    with it (Llama-style templates write BOS themselves; Qwen has none)."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. ``{"enable_thinking": false}`` for Qwen3."""

    def __post_init__(self) -> None:
        check_choice("prompt.chat", self.chat, ("auto", "template", "none"))
        if not isinstance(self.template_kwargs, dict):
            raise ConfigError("prompt.template_kwargs: expected a mapping of template variables")


@dataclass
class ModelInput:
    """The rendered text of a record and its token ids (BOS included when configured)."""

    text: str
    ids: list[int]


def _uses_chat(tokenizer: Tokenizer | None, cfg: PromptConfig) -> bool:
    if cfg.chat == "none":
        return False
    if tokenizer is None:
        if cfg.chat == "template":
            raise ValueError("prompt.chat='template' needs a tokenizer to render the chat template")
        return False
    if cfg.chat == "template":
        if not tokenizer.has_chat_template:
            raise ValueError(f"prompt.chat='template' but tokenizer {tokenizer.name} has no chat template")
        return True
    return tokenizer.has_chat_template


def render_prompt(record: Mapping[str, Any], tokenizer: Tokenizer | None, cfg: PromptConfig | None = None) -> str:
    """Text the model is given for ``record``; its answer is expected to continue this text.

    Uses the record's ``prompt`` (the user turn: instructions, context, question) and
    ``answer_prefix`` (the start of the answer, e.g. ``"Answer:"``; may be empty). With a chat
    template the prefix opens the assistant turn, as RULER does for chat models.
    """
    cfg = cfg or PromptConfig()
    prompt = record["prompt"]
    prefix = record.get("answer_prefix") or ""
    if not _uses_chat(tokenizer, cfg):
        return f"{prompt}\n{prefix}"
    messages: list[dict[str, str]] = []
    if cfg.system_prompt is not None:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **cfg.template_kwargs)
    return text + prefix


def encode_prompt_text(text: str, tokenizer: Tokenizer, cfg: PromptConfig | None = None) -> list[int]:
    """Ids of an already rendered prompt; adds BOS per ``cfg.add_bos`` (the one place it is added)."""
    cfg = cfg or PromptConfig()
    ids = tokenizer.encode(text)
    if cfg.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def build_model_input(
    record: Mapping[str, Any], tokenizer: Tokenizer, cfg: PromptConfig | None = None
) -> ModelInput:
    """``render_prompt`` plus its ids from ``encode_prompt_text``."""
    text = render_prompt(record, tokenizer, cfg)
    return ModelInput(text=text, ids=encode_prompt_text(text, tokenizer, cfg))


def encode_completion(text: str, tokenizer: Tokenizer, add_eos: bool = True) -> list[int]:
    """Token ids of an answer that continues ``build_model_input``'s ids (SFT targets, RL responses)."""
    ids = tokenizer.encode(text)
    return ids + [tokenizer.eos_id] if add_eos else ids
