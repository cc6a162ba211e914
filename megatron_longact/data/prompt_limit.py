"""``data.max_prompt_length``: what happens to task records whose prompt is too long.

The prompt is measured after the template (``build_model_input``), in tokens of the run's
tokenizer. ``filter`` drops such records before training (the count is printed at start-up and
logged as ``data/prompts_filtered``); ``truncate`` keeps the last ``max_prompt_length`` tokens of
each prompt (the task prompts end with the question and the answer cue, which must survive; the
context is cut from its start) and counts the truncated prompts in ``data/prompts_truncated``;
``error`` stops before any model is built, naming the first record over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longact.config import ConfigError


@dataclass
class PromptLimitReport:
    total: int
    over: int
    filtered: int
    longest: int

    def metrics(self) -> dict[str, float]:
        return {"data/records": float(self.total - self.filtered), "data/prompts_over_limit": float(self.over),
                "data/prompts_filtered": float(self.filtered)}


def apply_prompt_limit(records: list[dict], prompt_ids, data_cfg) -> tuple[list[dict], PromptLimitReport | None]:
    """Records to train on under ``data_cfg.max_prompt_length``; ``prompt_ids(record)`` gives
    the untruncated prompt tokens. Returns (records, report); report None without a limit."""
    limit = data_cfg.max_prompt_length
    if limit is None:
        return records, None
    lengths = [len(prompt_ids(r)) for r in records]
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over and data_cfg.prompt_overflow == "error":
        i = over[0]
        raise ConfigError(f"data.max_prompt_length: record {records[i].get('id', i)} has a {lengths[i]}-token "
                          f"prompt, over the limit of {limit}; raise the limit or set "
                          "data.prompt_overflow to filter or truncate")
    kept = records
    if data_cfg.prompt_overflow == "filter":
        drop = set(over)
        kept = [r for i, r in enumerate(records) if i not in drop]
        if not kept:
            raise ConfigError(f"data.max_prompt_length: every one of the {len(records)} records has a "
                              f"prompt over {limit} tokens (shortest {min(lengths)})")
    report = PromptLimitReport(total=len(records), over=len(over),
                               filtered=len(over) if data_cfg.prompt_overflow == "filter" else 0,
                               longest=max(lengths))
    return kept, report


def limit_prompt(ids: list[int], data_cfg) -> tuple[list[int], bool]:
    """(ids, truncated?) for one prompt under ``truncate``; unchanged otherwise."""
    limit = data_cfg.max_prompt_length
    if limit is None or len(ids) <= limit or data_cfg.prompt_overflow != "truncate":
        return ids, False
    return ids[-limit:], True
