"""The ``rollout`` section of a run config: which engine generates, and its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, check_positive, check_range

ENGINES = ("megatron", "vllm", "vllm_server")


@dataclass
class RolloutConfig:
    """Where rollouts (and evaluation responses) are generated; see docs/rollout.md.

    ``megatron`` needs nothing beyond the package: the training model generates with megatron's
    static KV cache. ``vllm``: a vLLM engine inside the training job, on the first rank of each
    model-parallel group, built from and synced with the policy's weights. ``vllm_server``: running
    vLLM OpenAI-compatible servers (``server_urls``), weights pushed to them through a folder on
    shared storage. Both vLLM engines need the ``vllm`` extra."""

    engine: Literal["megatron", "vllm", "vllm_server"] = "megatron"
    sync_interval: int = 1
    """Push the policy's weights to the engine after every this many RL steps (an RL step ends
    with its ``rl.ppo_epochs x rl.mini_batches`` optimizer steps; rollouts only happen between RL
    steps, so pushing inside one would be wasted). Between pushes the rollouts lag by up to
    ``sync_interval - 1`` steps; the old log-probs of the ratio are always recomputed by megatron,
    and the lag shows in ``rollout/mismatch_*``."""
    gpu_memory_utilization: float = 0.5
    """vllm: fraction of GPU memory the engine may take (weights + KV cache), next to training."""
    kv_cache_gib: int = 1
    """vllm on CPU: KV-cache size in whole GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    max_num_batched_tokens: int | None = None
    """vllm: tokens per engine step. None: vLLM's default on GPU; on CPU ``max_model_len *
    max_num_seqs``, so that no prefill is chunked (vLLM's CPU sampler fails on per-sample seeds in
    chunked prefills; docs/rollout.md)."""
    max_num_seqs: int = 256
    """vllm: sequences the engine runs at once."""
    tensor_parallel_size: int = 1
    """vllm: engine tensor parallelism. 1 on CPU; on GPU it must equal the training TP size (each
    training rank then holds one engine shard, vLLM's external launcher; docs/rollout.md)."""
    enable_sleep_mode: bool = False
    """vllm on GPU: release the engine's weights and KV cache while the policy trains (vLLM
    sleep/wake, as verl's hybrid engine); no effect on CPU."""
    server_urls: list[str] = field(default_factory=list)
    """vllm_server: base URLs of the servers (``http://host:port``); prompts are spread over them."""
    weights_dir: str | None = None
    """vllm_server: folder on storage the servers can read, where each push writes the weights
    (safetensors); None: ``<output.dir>/rollout/weights``."""
    request_timeout: float = 600.0
    """vllm_server: seconds to wait for one HTTP request."""
    is_correction: Literal["none", "tis"] = "none"
    """Training-inference mismatch correction of the policy loss. ``tis``: truncated importance
    sampling, each response token's advantage weighted by min(pi_megatron / pi_engine, is_cap)
    (the old policy as megatron computes it over the engine's sampling probability)."""
    is_cap: float = 2.0
    """Truncation C of the importance weight (``tis``)."""

    def __post_init__(self):
        check_choice("rollout.engine", self.engine, ENGINES)
        check_positive("rollout.sync_interval", self.sync_interval)
        check_range("rollout.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0,
                    low_open=True)
        check_positive("rollout.kv_cache_gib", self.kv_cache_gib)
        check_positive("rollout.max_num_batched_tokens", self.max_num_batched_tokens)
        check_positive("rollout.max_num_seqs", self.max_num_seqs)
        check_positive("rollout.tensor_parallel_size", self.tensor_parallel_size)
        check_positive("rollout.request_timeout", self.request_timeout)
        check_choice("rollout.is_correction", self.is_correction, ("none", "tis"))
        check_positive("rollout.is_cap", self.is_cap)
        if self.is_cap < 1.0:
            raise ConfigError(f"rollout.is_cap: got {self.is_cap!r}, expected a number >= 1 (the "
                              "truncation of an importance weight whose mean is 1)")
        if self.engine == "vllm_server":
            if not self.server_urls:
                raise ConfigError("rollout.server_urls: required for rollout.engine=vllm_server "
                                  "(e.g. [http://127.0.0.1:8000])")
            for i, url in enumerate(self.server_urls):
                if not url.startswith(("http://", "https://")):
                    raise ConfigError(f"rollout.server_urls[{i}]: got {url!r}, expected "
                                      "http://host:port")
        elif self.server_urls:
            raise ConfigError(f"rollout.server_urls: only used with rollout.engine=vllm_server, "
                              f"not {self.engine!r}")
        if self.is_correction != "none" and self.engine == "megatron":
            raise ConfigError("rollout.is_correction: the megatron engine samples with the "
                              "training model itself (no mismatch to correct); use it with "
                              "rollout.engine vllm or vllm_server")

    @property
    def external(self) -> bool:
        """True when another program's numerics sample the rollouts (vLLM)."""
        return self.engine != "megatron"
