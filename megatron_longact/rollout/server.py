"""``rollout.engine: vllm_server``: rollouts from running vLLM OpenAI-compatible servers.

The servers run outside the job (``python -m vllm.entrypoints.openai.api_server --model DIR
...``, started with ``VLLM_SERVER_DEV_MODE=1`` so that they accept weight reloads); their base
URLs are ``rollout.server_urls``.

- Prompts: every rank of a data-parallel replica holds the same prompts; the replica's host (TP,
  PP and CP rank 0) sends one ``/v1/completions`` request per row (token-id prompt, the row's
  seed, ``logprobs`` of the sampled token, ``return_token_ids``), spread round-robin over the
  servers and in flight together, and broadcasts the results over its replica.
- Weights: on a push, replica 0 gathers the policy in HF layout
  (:func:`~megatron_longact.rollout.weights.gather_hf_weights`), its host writes them as
  safetensors into a fresh folder under ``rollout.weights_dir`` (storage the servers read) and
  asks every server to reload from it (``/collective_rpc`` ``reload_weights`` with
  ``weights_path``), then resets each server's prefix cache. All ranks wait for the push, so no
  rollout reads a server mid-reload. The previous folder is deleted after the push.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_longact.generation import GenerationOutput
from megatron_longact.rollout.base import RolloutEngine
from megatron_longact.rollout.vllm_engine import _row_seed, to_generation_output, write_safetensors
from megatron_longact.rollout.weights import EngineGroups, gather_hf_weights
from megatron_longact.runtime import collectives


def post(url: str, payload: dict | None, timeout: float) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"rollout: {url} answered HTTP {exc.code}: "
                           f"{exc.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"rollout: cannot reach {url} ({exc})") from None
    return json.loads(body) if body.strip() else {}


class VLLMServerEngine(RolloutEngine):
    name = "vllm_server"
    external = True

    def __init__(self, rollout, *, model, model_cfg, eos_id: int, pad_id: int, vocab_size: int,
                 max_model_len: int, work_dir, bos_id: int | None = None,
                 groups: EngineGroups | None = None):
        super().__init__(rollout.sync_interval)
        self.cfg, self.model, self.model_cfg = rollout, model, model_cfg
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.max_model_len = max_model_len
        self.groups = groups or EngineGroups.from_parallel_state()
        self.groups.check()
        self.urls = [u.rstrip("/") for u in rollout.server_urls]
        self.weights_dir = Path(rollout.weights_dir) if rollout.weights_dir else Path(work_dir) / "weights"
        self.pushes = 0
        self.last_sync_seconds = 0.0
        self.names = {}
        if self.groups.is_host:
            for url in self.urls:
                models = post(f"{url}/v1/models", None, rollout.request_timeout)
                self.names[url] = models["data"][0]["id"]
        self.sync_weights()

    def _push_weights(self) -> None:
        t0 = time.monotonic()
        if self.groups.dp_rank == 0:
            items = gather_hf_weights(self.model, self.model_cfg, self.groups)
            if self.groups.is_host:
                folder = self.weights_dir / f"push_{self.pushes:06d}"
                if folder.exists():
                    shutil.rmtree(folder)
                write_safetensors(folder, items)
                timeout = self.cfg.request_timeout
                for url in self.urls:
                    post(f"{url}/collective_rpc", {"method": "reload_weights",
                                                   "kwargs": {"weights_path": str(folder.absolute())}},
                         timeout)
                    post(f"{url}/reset_prefix_cache", {}, timeout)
                old = self.weights_dir / f"push_{self.pushes - 1:06d}"
                if old.exists():
                    shutil.rmtree(old)
        self.pushes += 1
        collectives.barrier()  # no replica generates before every server has the new weights
        self.last_sync_seconds = time.monotonic() - t0

    def _one(self, k: int, prompt: list[int], sampling, sample_id: int):
        url = self.urls[k % len(self.urls)]
        payload = {"model": self.names[url], "prompt": prompt, "max_tokens": sampling.max_new_tokens,
                   "temperature": float(sampling.temperature), "logprobs": 0,
                   "return_token_ids": True, "return_tokens_as_token_ids": True,
                   "stop_token_ids": [self.eos_id] if self.eos_id >= 0 and not sampling.ignore_eos else [],
                   "ignore_eos": True,
                   "n": 1}
        if sampling.temperature > 0:
            payload.update(top_p=float(sampling.top_p), top_k=int(sampling.top_k) or -1,
                           seed=_row_seed(sampling.seed, sample_id) % (2**31 - 1))
        choice = post(f"{url}/v1/completions", payload, self.cfg.request_timeout)["choices"][0]
        ids = list(choice.get("token_ids") or [])
        lps = [float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or []]
        if len(lps) != len(ids):
            raise RuntimeError(f"rollout: {url} returned {len(ids)} tokens but {len(lps)} log-probs")
        return ids, lps, choice.get("finish_reason")

    def generate(self, prompts, sampling, *, sample_ids=None) -> GenerationOutput:
        prompts = [list(map(int, p)) for p in prompts]
        ids = list(sample_ids) if sample_ids is not None else \
            [self.groups.dp_rank * 2**32 + i for i in range(len(prompts))]
        out = None
        if self.groups.is_host:
            offset = self.groups.dp_rank  # replicas start on different servers
            with ThreadPoolExecutor(max_workers=min(64, max(1, len(prompts)))) as pool:
                rows = list(pool.map(lambda a: self._one(a[0] + offset, a[1], sampling, a[2]),
                                     zip(range(len(prompts)), prompts, ids)))
            out = to_generation_output(prompts, rows, sampling.max_new_tokens, self.pad_id)
        return self.groups.share(out)
