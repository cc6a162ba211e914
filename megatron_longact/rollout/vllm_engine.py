"""Colocated vLLM rollouts: one vLLM engine per data-parallel replica, inside the training job.

Who hosts what (docs/rollout.md has the picture):

- The *host* of a replica is its rank with TP, PP and CP rank 0. It starts one engine process
  (:func:`_engine_main`, a child of the host, spawned) that runs ``vllm.LLM`` in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). The engine lives in its own process because vLLM
  initializes torch.distributed (a world of its own) and sets process-wide thread and device
  state, which must not meet the training job's process groups.
- Prompts never leave their replica: every rank of a replica holds the same prompts (the
  contract of :class:`~megatron_longact.rollout.base.RolloutEngine`), the host sends them to its
  engine, and the results are broadcast from the host over the model-parallel group, then over
  the context-parallel group. Data-parallel ranks do not talk to each other for a rollout.
- Weights: after every ``rollout.sync_interval`` RL steps every rank takes part in
  :func:`~megatron_longact.rollout.weights.gather_hf_weights` (TP all-gather, PP gather to the
  host, mapping to HF names), and the host hands the HF tensors to its engine, which reloads them
  in place (vLLM's ``reload_weights``) and resets its prefix cache (stale KV of the old weights
  would otherwise be reused). The engine is never restarted.

Transport: the gathered weights are in host memory on every machine (the gather never holds the
whole model on a GPU), and cross the process boundary through ``torch.multiprocessing`` pickling,
their storage through shared memory; vLLM copies them to its device while it reloads. The first
push moves them into shared memory and the engine keeps its handles; later pushes write the new
values into the same shared tensors and only ask the engine to reload (``_send_shared``). So the GPU
path is the tested CPU path. With engine tensor parallelism > 1 (GPU), vLLM's own workers sit
behind the engine and take no tensors, so the host writes a safetensors folder in ``/dev/shm`` and
the engine reloads from that path (the transport of the server mode, tested there).

GPU memory: with ``rollout.enable_sleep_mode`` the engine releases its weights and KV cache
after each rollout (vLLM ``sleep(level=1)``) and wakes up before the next push or rollout, as
verl's hybrid engine does; sleep is a no-op on CPU.
"""

from __future__ import annotations

import multiprocessing.util as mp_util
import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from megatron_longact.generation import GenerationOutput
from megatron_longact.rollout.base import RolloutEngine
from megatron_longact.rollout.weights import EngineGroups, gather_hf_weights


def _row_seed(seed: int, sample_id: int) -> int:
    # Per-row seed, a function of (seed, sample id) only (as generation.row_keys).
    return (seed * 0x9E3779B97F4A7C15 + int(sample_id)) % (2**63 - 1)


def sampling_params_kwargs(sampling, eos_id: int, sample_ids) -> list[dict]:
    """vLLM ``SamplingParams`` fields, one dict per row (plain data: they cross processes)."""
    # Our EOS id stops a row (a negative id or sampling.ignore_eos: nothing does); the model
    # config's own EOS is ignored, as megatron's sampler knows only ours.
    stop = [eos_id] if eos_id >= 0 and not sampling.ignore_eos else []
    base = dict(max_tokens=sampling.max_new_tokens, stop_token_ids=stop,
                ignore_eos=True, logprobs=0, temperature=float(sampling.temperature), detokenize=False)
    if sampling.temperature > 0:
        base.update(top_p=float(sampling.top_p), top_k=int(sampling.top_k) if sampling.top_k else -1)
    return [dict(base, seed=_row_seed(sampling.seed, s)) if sampling.temperature > 0 else dict(base)
            for s in sample_ids]


def to_generation_output(prompts, rows, max_new_tokens: int, pad_id: int) -> GenerationOutput:
    """Pack per-row ``(token_ids, log_probs, finish_reason)`` into a GenerationOutput."""
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = (int(lengths.max()) if batch else 0) + max_new_tokens
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    responses = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long)
    log_probs = torch.zeros(batch, max_new_tokens, dtype=torch.float32)
    n_B = torch.zeros(batch, dtype=torch.long)
    truncated = torch.zeros(batch, dtype=torch.bool)
    for i, (p, (ids, lps, reason)) in enumerate(zip(prompts, rows)):
        ids = list(ids)[:max_new_tokens]
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        if ids:
            tokens[i, len(p):len(p) + len(ids)] = torch.tensor(ids, dtype=torch.long)
            responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            log_probs[i, :len(ids)] = torch.tensor(lps[:len(ids)], dtype=torch.float32)
        n_B[i] = len(ids)
        truncated[i] = reason != "stop"
    return GenerationOutput(tokens=tokens, prompt_lengths=lengths, responses=responses,
                            response_lengths=n_B, log_probs=log_probs, truncated=truncated)


def write_hf_config(folder: Path, model_cfg, *, eos_id: int, bos_id: int | None, dtype: str) -> None:
    """config.json (and generation_config.json) of the engine's model folder."""
    import json

    from megatron_longact.convert import hf as hfmap

    hf = hfmap.hf_config_from_model_config(model_cfg)
    hf.update(eos_token_id=eos_id, torch_dtype=dtype)
    if bos_id is not None:
        hf["bos_token_id"] = bos_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
    gen = {"eos_token_id": eos_id, **({"bos_token_id": bos_id} if bos_id is not None else {})}
    (folder / "generation_config.json").write_text(json.dumps(gen) + "\n")


def write_safetensors(folder: Path, items) -> None:
    """The HF tensors as ``model.safetensors`` in ``folder``, written then renamed into place."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in items}, str(tmp), metadata={"format": "pt"})
    tmp.rename(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# The engine process


def _engine_main(conn, settings: dict) -> None:
    """Child process: build ``vllm.LLM`` in-process and serve requests from the host over ``conn``
    until told to close (or until the host dies)."""
    import signal

    # The host decides when the engine stops (it closes it after saving on SIGTERM); a signal to
    # the process group must not kill the engine in the middle of a request.
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    os.environ["LONGACT_EXIT_WITH_PARENT"] = "1"
    from megatron_longact.runtime.watchdog import exit_with_launcher

    exit_with_launcher()
    try:
        os.environ.update(settings["env"])
        from vllm import LLM, SamplingParams

        llm = LLM(**settings["llm"])
        sleeping = False
        conn.send(("ready", os.getpid()))
    except BaseException:  # noqa: BLE001 - reported to the host, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    sleep_mode = settings["llm"].get("enable_sleep_mode", False)
    staged = None  # the host's shared-memory weights of the last "load"
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[0]
        try:
            if kind == "close":
                conn.send(("ok", None))
                return
            if sleeping:
                llm.wake_up()
                sleeping = False
            t0 = time.monotonic()
            if kind in ("load", "reload"):
                if kind == "load":
                    # Host-memory tensors, their storage in shared memory. Kept: the host writes
                    # the next pushes' values into the same storage and sends "reload".
                    staged = msg[1]
                elif staged is None:
                    raise RuntimeError("reload requested before any weights were loaded")
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": staged,
                                                            "is_checkpoint_format": True})
                llm.reset_prefix_cache()
                reply = time.monotonic() - t0
            elif kind == "load_path":
                llm.collective_rpc("reload_weights", kwargs={"weights_path": msg[1],
                                                            "is_checkpoint_format": True})
                llm.reset_prefix_cache()
                reply = time.monotonic() - t0
            elif kind == "generate":
                prompts, params = msg[1], msg[2]
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                    [SamplingParams(**k) for k in params], use_tqdm=False)
                reply = []
                for o in outs:
                    c = o.outputs[0]
                    lps = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs or [])]
                    reply.append((list(c.token_ids), lps, c.finish_reason))
                if sleep_mode:
                    llm.sleep(level=1)
                    sleeping = True
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send(("ok", reply))
        except BaseException:  # noqa: BLE001 - reported to the host
            conn.send(("error", traceback.format_exc()))


class EngineProcess:
    """The host's handle on its engine process."""

    def __init__(self, settings: dict, start_timeout: float = 600.0):
        import multiprocessing as mp

        import torch.multiprocessing  # noqa: F401 - registers tensor sharing for the pipe

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # Not daemonic: vLLM may start helper processes of its own.
        self.proc = ctx.Process(target=_engine_main, args=(child, settings), daemon=False,
                                name="longact-vllm-engine")
        self.proc.start()
        child.close()
        # A host leaving by an exception without close() would otherwise hang at exit:
        # multiprocessing joins non-daemonic children at exit, and the engine waits for requests.
        # Its finalizers with an exit priority run before that join (in a main process and in a
        # multiprocessing child alike, where atexit handlers never run).
        self._finalizer = mp_util.Finalize(self, _stop_engine, args=(self.proc, self.conn),
                                           exitpriority=10)
        try:
            kind, value = self._recv(start_timeout, "start")
        except BaseException:
            self.close()
            raise
        if kind != "ready":
            self.close()
            raise RuntimeError(f"rollout: the vLLM engine failed to start:\n{value}")
        self.pid = value

    def _recv(self, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"rollout: the vLLM engine process (pid {self.proc.pid}) exited "
                                   f"with code {self.proc.exitcode} during {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout: no answer from the vLLM engine in {timeout:.0f} s ({what})")
        return self.conn.recv()

    def request(self, *msg, timeout: float = 3600.0):
        self.conn.send(msg)
        kind, value = self._recv(timeout, msg[0])
        if kind == "error":
            raise RuntimeError(f"rollout: the vLLM engine failed on {msg[0]!r}:\n{value}")
        return value

    def close(self) -> None:
        self._finalizer()  # runs _stop_engine once


def _stop_engine(proc, conn, timeout: float = 30.0) -> None:
    """Ask the engine process to finish, then make sure it did (module level: a finalizer must
    not hold its object)."""
    if proc.is_alive():
        try:
            conn.send(("close",))
            if conn.poll(timeout):
                conn.recv()
        except (OSError, EOFError):
            pass
        proc.join(timeout=timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=10)
    conn.close()


class VLLMEngine(RolloutEngine):
    """``rollout.engine: vllm`` (see the module docstring)."""

    name = "vllm"
    external = True

    def __init__(self, rollout, *, model, model_cfg, eos_id: int, pad_id: int, vocab_size: int,
                 max_model_len: int, work_dir, seed: int, groups: EngineGroups | None = None,
                 bos_id: int | None = None):
        super().__init__(rollout.sync_interval)
        self.cfg, self.model, self.model_cfg = rollout, model, model_cfg
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.groups = groups or EngineGroups.from_parallel_state()
        self.groups.check()
        self.cuda = torch.cuda.is_available() and next(iter(_params(model))).is_cuda
        if rollout.tensor_parallel_size > 1 and not self.cuda:
            from megatron_longact.errors import UsageError

            raise UsageError("rollout.tensor_parallel_size: engine tensor parallelism needs GPUs; "
                             "use 1 on CPU")
        self.folder_transport = rollout.tensor_parallel_size > 1
        self.max_model_len = max_model_len
        self.process = None
        self._staged: list[tuple[str, torch.Tensor]] | None = None  # see _send_shared
        self.last_sync_seconds = 0.0
        if self.groups.is_host:
            self.folder = Path(work_dir) / f"vllm_engine_dp{self.groups.dp_rank}"
            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[model_cfg.params_dtype]
            write_hf_config(self.folder, model_cfg, eos_id=eos_id, bos_id=bos_id, dtype=dtype)
            self.process = EngineProcess(self._settings(dtype, seed))
        # The engine starts with dummy weights; the first push gives it the policy's.
        self.sync_weights()

    def _settings(self, dtype: str, seed: int) -> dict:
        c = self.cfg
        max_tokens = c.max_num_batched_tokens
        if max_tokens is None and not self.cuda:
            # vLLM's CPU sampler fails on per-request seeds once a prefill is chunked; a budget of
            # every sequence at full length never chunks one.
            max_tokens = self.max_model_len * c.max_num_seqs
        llm = dict(model=str(self.folder), dtype=dtype, enforce_eager=True, skip_tokenizer_init=True,
                   max_model_len=self.max_model_len, seed=seed, load_format="dummy",
                   max_num_seqs=c.max_num_seqs, logprobs_mode="processed_logprobs",
                   tensor_parallel_size=c.tensor_parallel_size)
        if max_tokens is not None:
            llm["max_num_batched_tokens"] = max_tokens
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if c.tensor_parallel_size == 1 else "1",
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        if self.cuda:
            llm.update(gpu_memory_utilization=c.gpu_memory_utilization,
                       enable_sleep_mode=c.enable_sleep_mode)
            # The host's GPU and the next ones: its tensor-parallel peers (megatron puts TP ranks
            # on consecutive local ranks, one GPU each).
            local, visible = torch.cuda.current_device(), _visible_devices()
            if local + c.tensor_parallel_size > len(visible):
                from megatron_longact.errors import UsageError

                raise UsageError(f"rollout.tensor_parallel_size: {c.tensor_parallel_size} GPUs from "
                                 f"local GPU {local} on, but this node has {len(visible)}")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[local:local + c.tensor_parallel_size])
        else:
            # The engine computes while the host waits for it: give it the host's threads (vLLM
            # drops to one thread unless OMP_NUM_THREADS says otherwise).
            env.update(VLLM_CPU_KVCACHE_SPACE=str(c.kv_cache_gib),
                       VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                       OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
        return {"llm": llm, "env": env}

    def _push_weights(self) -> None:
        t0 = time.monotonic()
        items = gather_hf_weights(self.model, self.model_cfg, self.groups,
                                  into=dict(self._staged) if self._staged is not None else None)
        if self.process is not None:
            if self.folder_transport:
                shm = Path("/dev/shm") / f"longact_weights_{os.getpid()}"
                write_safetensors(shm, items)
                try:
                    self.process.request("load_path", str(shm))
                finally:
                    shutil.rmtree(shm, ignore_errors=True)
            else:
                self._send_shared(items)
        self.last_sync_seconds = time.monotonic() - t0

    def _send_shared(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Hand the weights to the engine through shared memory. The first push moves them into
        shared memory and the engine keeps its handles; later pushes gather straight into the
        same tensors (``gather_hf_weights(into=...)``) and only ask it to reload, instead of
        making a shared-memory segment and passing a descriptor per tensor every time (most of a
        push of a small model: 39-47 ms against 14-22 ms for the demo's). The host thus keeps the
        HF weights in host memory between pushes, once, as each push held them while it ran."""
        staged = self._staged
        if staged is not None and len(staged) == len(items) and all(
                n == m and a is b for (n, a), (m, b) in zip(staged, items)):
            self.process.request("reload")
            return
        self._staged = None
        staged = [(n, t.share_memory_()) for n, t in items]  # gather_hf_weights made copies
        self.process.request("load", staged)
        self._staged = staged

    def generate(self, prompts, sampling, *, sample_ids=None) -> GenerationOutput:
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}]: empty; a prompt needs at least one token (e.g. BOS)")
            if len(p) + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens + max_new_tokens "
                                 f"{sampling.max_new_tokens} exceed the engine's max_model_len "
                                 f"{self.max_model_len}")
        ids = list(sample_ids) if sample_ids is not None else \
            [self.groups.dp_rank * 2**32 + i for i in range(len(prompts))]
        out = None
        if self.process is not None:
            rows = self.process.request("generate", prompts,
                                        sampling_params_kwargs(sampling, self.eos_id, ids)) \
                if prompts else []
            out = to_generation_output(prompts, rows, sampling.max_new_tokens, self.pad_id)
        return self.groups.share(out)

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None
        self._staged = None


def _params(model):
    from megatron_longact.models.builder import unwrap

    return unwrap(model[0] if isinstance(model, (list, tuple)) else model).parameters()


def _visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]
