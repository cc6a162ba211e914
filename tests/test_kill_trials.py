"""kill -9 in the middle of a save never loses a checkpoint, and ranks never outlive their launcher.

Real processes: 2 gloo ranks under torchrun (or launch/local.sh), the tiny model in SFT mode. A
test hook in the checkpoint module (LONGACT_TEST_PAUSE_IN_SAVE) holds a save at a chosen point so
that the kill lands inside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACKER = "latest_checkpointed_iteration.txt"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "LONGACT_TEST_PAUSE_IN_SAVE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _overrides(out: Path, steps: int = 4, **over) -> list[str]:
    o = {"train.mode": "sft", "train.steps": steps, "train.micro_batch_size": 2, "train.lr": 1e-3,
         "sft.batch_size": 4, "data.ruler.num_samples": 16, "data.ruler.template": "compact",
         "data.ruler.number_digits": 3, "data.ruler.lengths": "[160]", "data.ruler.tasks": "[niah_single_1]",
         "checkpoint.interval": 1, "checkpoint.keep": 10, "output.dir": str(out)}
    o.update(over)
    return [f"{k}={v}" for k, v in o.items()]


def _torchrun(out: Path, **over) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megatron_longact.cli.train", "--config", str(ROOT / "configs/model/tiny.yaml"),
            *_overrides(out, **over)]


def _run(cmd, env, timeout=240):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr  # log lines may go to either


def _history(out: Path) -> dict[int, dict]:
    return {h["step"]: h for h in json.loads((out / "history.json").read_text())["history"]}


def _marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``LONGACT_TEST_LAUNCH=<marker>`` (every process of
    one launch inherits it: launcher, ranks and the ranks' own helpers)."""
    needle = f"LONGACT_TEST_LAUNCH={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def _start_and_kill_when(cmd, env, ready, timeout=240):
    """Start ``cmd`` in its own process group; kill -9 the whole group once ``ready()``. Every
    process of the launch (the ranks' helper processes too) must then be gone within 10 s."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**env, "LONGACT_TEST_LAUNCH": marker}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    survivors = []
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before the kill point: {proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the run never reached the kill point")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        gone_by = time.monotonic() + 10
        while _marked(marker) and time.monotonic() < gone_by:
            time.sleep(0.2)
        survivors = [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200]) for pid in _marked(marker)]
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        for pid in _marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not survivors, f"processes of the killed launch outlived it: {survivors}"


def test_kill_inside_a_save_resumes_from_the_last_published_step(tmp_path):
    full = tmp_path / "full"
    _run(_torchrun(full), _env())
    ref = _history(full)

    # Killed while step 3's files are written but not yet published.
    cut = tmp_path / "cut"
    ckpts = cut / "checkpoints"
    pending = ckpts / ".tmp_iter_0000003"
    _start_and_kill_when(_torchrun(cut), _env(LONGACT_TEST_PAUSE_IN_SAVE="3:60:write"),
                         lambda: pending.is_dir() and (pending / ".metadata").is_file())
    assert (ckpts / TRACKER).read_text().strip() == "2"
    assert not (ckpts / "iter_0000003").exists()

    log = _run(_torchrun(cut), _env())
    assert "resumed from" in log and "iter_0000002 at step 2" in log, log[-2000:]
    assert "removed the interrupted save .tmp_iter_0000003" in log
    got = _history(cut)
    assert sorted(got) == [2, 3]
    for step in (2, 3):
        assert got[step]["sft/loss"] == ref[step]["sft/loss"], (step, got[step], ref[step])
        assert got[step]["train/grad_norm"] == ref[step]["train/grad_norm"]
    assert (ckpts / TRACKER).read_text().strip() == "4"

    # Re-launching the finished run re-saves step 4; killed between moving the published copy
    # aside and moving the new one in.
    _start_and_kill_when(_torchrun(cut), _env(LONGACT_TEST_PAUSE_IN_SAVE="4:60:swap"),
                         lambda: (ckpts / ".old_iter_0000004").is_dir())
    assert not (ckpts / "iter_0000004").exists()
    assert (ckpts / TRACKER).read_text().strip() == "4"
    log = _run(_torchrun(cut), _env())
    assert "restored iter_0000004 from .old_iter_0000004" in log, log[-2000:]
    assert "iter_0000004 at step 4" in log
    assert (ckpts / "iter_0000004" / "manifest.json").is_file()
    assert not any(p.name.startswith((".old_", ".tmp_")) for p in ckpts.iterdir())


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _ranks_of(launcher: int) -> list[int]:
    """The trainer processes below ``launcher`` (any depth)."""
    found, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            todo.append(child)
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"megatron_longact.cli.train" in cmdline and b"torch.distributed.run" not in cmdline \
                    and b"torchrun" not in cmdline:
                found.append(child)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("victim", ["torchrun", "local.sh"])
def test_ranks_exit_when_the_launcher_is_killed(tmp_path, victim):
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch/local.sh"), "2", str(ROOT / "configs/model/tiny.yaml"),
           *_overrides(out, steps=100000, **{"checkpoint.interval": 0})]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while len(ranks) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2, "the ranks never started"
        # Training (the watchdog is armed first thing in main, after the interpreter's imports).
        while not (out / "tb").is_dir() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        torchrun = [c for c in _children(proc.pid)]
        target = proc.pid if victim == "local.sh" else torchrun[0]
        os.kill(target, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), f"orphaned ranks {[r for r in ranks if _alive(r)]}"
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_sh_forwards_sigusr1_and_the_ranks_save(tmp_path):
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "launch/local.sh"), "2", str(ROOT / "configs/model/tiny.yaml"),
           *_overrides(out, steps=100000, **{"checkpoint.interval": 0})]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "tb").is_dir() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)  # a few steps in
        os.kill(proc.pid, signal.SIGUSR1)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, text[-3000:]
    assert "forwarding SIGUSR1 to ranks" in text
    assert "stop requested by signal" in text
    step = int((out / "checkpoints" / TRACKER).read_text())
    assert step > 0 and (out / "checkpoints" / f"iter_{step:07d}" / "manifest.json").is_file()
