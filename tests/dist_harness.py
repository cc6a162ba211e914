"""Run a function on N gloo ranks on 127.0.0.1 from inside pytest.

    results = run_distributed(fn, tp=2, pp=1, cp=1, dp=2, args=(...,), timeout=180)

Each rank is a fresh spawned process: it sets the torchrun variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT on a free port), calls ``megatron_longact.runtime.initialize`` with the
layout, runs ``fn(runtime, *args)`` and sends back its return value. ``fn`` must be a module-level
function (it is pickled by reference); results may hold tensors. An exception on any rank is re-raised in the test as
:class:`RankError` carrying that rank's traceback; ranks still running after ``timeout`` seconds are
killed and :class:`TimeoutError` names them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


class RankError(RuntimeError):
    """An exception raised on one rank of a distributed test."""

    def __init__(self, rank: int, tb: str):
        super().__init__(f"rank {rank} failed:\n{tb}")
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, layout, seed, fn, args, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        # One compute thread per rank: the machines running the tests have few cores.
        OMP_NUM_THREADS="1",
    )
    os.environ.pop("SLURM_PROCID", None)
    try:
        import torch

        torch.set_num_threads(1)
        from megatron_longact.runtime import ParallelConfig, destroy, initialize

        tp, pp, cp, dp = layout
        runtime = initialize(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           context_parallel_size=cp, data_parallel_size=dp,
                           distributed_timeout_minutes=5),
            seed=seed,
        )
        try:
            result = fn(runtime, *args)
        finally:
            destroy()
        # Plain pickle: the queue's own pickler would pass tensors as shared-memory handles that
        # die with this process before the test reads them.
        out.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        out.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, *, tp: int = 1, pp: int = 1, cp: int = 1, dp: int = 1, args: tuple = (),
                    timeout: float = 300.0, seed: int = 1234) -> list:
    """Run ``fn(runtime, *args)`` on ``tp*pp*cp*dp`` gloo ranks; return the results by rank."""
    world_size = tp * pp * cp * dp
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        # Not daemonic: megatron's checkpoint writer starts a multiprocessing Manager in each rank.
        # The finally block below still ends every rank.
        ctx.Process(target=_worker, args=(r, world_size, port, (tp, pp, cp, dp), seed, fn, args, out),
                    daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish in {timeout:.0f} s")
            try:
                rank, status, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in results and not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    # Give a dying rank's message a moment to arrive before blaming the exit code.
                    try:
                        rank, status, payload = out.get(timeout=2.0)
                    except queue.Empty:
                        r = dead[0]
                        raise RankError(r, f"process exited with code {procs[r].exitcode} "
                                           "without reporting") from None
                else:
                    continue
            if status == "error":
                raise RankError(rank, payload)
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
