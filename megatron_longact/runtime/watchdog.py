"""Ranks exit when their launcher dies.

Under torchrun (or any launcher that starts the ranks as its children), a launcher killed with
SIGKILL cannot stop its ranks: they would train on unsupervised and race a restarted job for the
checkpoint folder. Two mechanisms, both armed only when a launcher is detected (torchrun's
``TORCHELASTIC_RUN_ID`` / ``LOCAL_RANK``, or ``LONGACT_EXIT_WITH_PARENT=1``), so that a run
started by hand under ``nohup`` keeps running after its shell exits:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the rank when its parent exits.
  SIGKILL, not SIGTERM: the launcher is gone, so a save-on-signal would race the restart; the
  atomic publish keeps the last complete checkpoint intact.
- everywhere: a daemon thread that polls the parent PID once a second and ends the process when it
  changes (covers non-Linux systems and a parent that was already gone when prctl ran).

A rank's own helper processes need the same tie: torchrun starts each rank in a session of its
own, so killing the launcher's process group does not reach them, and the kernel's parent-death
signal is not inherited. megatron-core's torch_dist checkpoint writer keeps, per rank, a
multiprocessing Manager (a spawned server process, made on the first save) for its results
queue; a rank killed with its launcher left that server running forever. On Linux the queue is
now made by a Manager whose server arms the same parent-death signal first thing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_armed = False


def _launched_by_launcher() -> bool:
    if os.environ.get("LONGACT_EXIT_WITH_PARENT") == "1":
        return True
    if os.environ.get("LONGACT_EXIT_WITH_PARENT") == "0":
        return False
    return "TORCHELASTIC_RUN_ID" in os.environ


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            print(f"rank {os.environ.get('RANK', '?')}: launcher (pid {parent}) is gone; exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)


def _die_with_parent() -> None:
    """Initializer of a helper process: the kernel kills it when the process that started it exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _tie_checkpoint_writer_manager() -> bool:
    """Make megatron's checkpoint-writer results queue (created lazily by
    ``filesystem_async._get_write_results_queue`` in megatron-core 0.16) come from a Manager whose
    server dies with this rank. False when that megatron function is not there."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as writer
    except ImportError:
        return False
    if not hasattr(writer, "_get_write_results_queue") or not hasattr(writer, "_results_queue"):
        return False

    def get_write_results_queue():
        if writer._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=_die_with_parent)
            # The queue's proxy holds the manager, which keeps the server up while it is used.
            writer._results_queue = manager.Queue()
        return writer._results_queue

    writer._get_write_results_queue = get_write_results_queue
    return True


def exit_with_launcher(interval: float = 1.0) -> bool:
    """Arm both mechanisms once (no-op without a launcher); True when armed."""
    global _armed
    if _armed or not _launched_by_launcher():
        return _armed
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        _die_with_parent()  # if prctl is unavailable, the polling thread below still covers it
        _tie_checkpoint_writer_manager()
    threading.Thread(target=_watch, args=(parent, interval), name="launcher-watchdog",
                     daemon=True).start()
    _armed = True
    return True
