"""Data plumbing: tokenizers, prompt rendering shared by training and evaluation, strict JSONL."""

from megatron_longact.data.jsonl import (  # noqa: F401
    TASK_RECORD_FIELDS,
    RecordError,
    check_fields,
    check_task_record,
    iter_jsonl,
    read_jsonl,
    read_task_records,
    write_jsonl,
)
from megatron_longact.data.tokenizer import (  # noqa: F401
    ByteTokenizer,
    HFTokenizer,
    ModelInput,
    PromptConfig,
    Tokenizer,
    TokenizerConfig,
    TokenizersJsonTokenizer,
    build_model_input,
    encode_completion,
    encode_prompt_text,
    load_tokenizer,
    render_prompt,
)
