"""The GPU acceptance script: argument parsing, its table, and its refusal to run without CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longact import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_selection():
    opts = gpu_check.parse_args([])
    assert opts.checks == list(gpu_check.CHECKS) and opts.seq == 8192 and opts.gpus is None
    opts = gpu_check.parse_args(["--only", "nccl,rl_tp1", "--skip", "rl_tp1", "--gpus", "4"])
    assert opts.checks == ["nccl"] and opts.gpus == 4


@pytest.mark.parametrize("argv,message", [
    (["--only", "nccl,warp"], "unknown check(s) warp"),
    (["--steps", "0"], "--steps: got 0"),
    (["--seq", "1000"], "--seq: got 1000, expected a multiple of 128"),
    (["--only", "nccl", "--skip", "nccl"], "no check left"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_result_line_table_and_tp():
    out = "noise\nGPU_CHECK_RESULT {\"status\": \"PASS\", \"detail\": \"x\"}\nmore\n"
    assert gpu_check.parse_result(out) == {"status": "PASS", "detail": "x"}
    assert gpu_check.parse_result("no result") is None
    table = gpu_check.format_table([{"check": "nccl", "status": "PASS", "seconds": 1.25, "detail": "ok"},
                                    {"check": "fp8_step", "status": "SKIP", "seconds": None, "detail": "no TE"}])
    lines = table.splitlines()
    assert lines[0].split() == ["check", "status", "seconds", "detail"]
    assert lines[2].split() == ["nccl", "PASS", "1.2", "ok"] and lines[3].split()[:3] == ["fp8_step", "SKIP", "-"]
    assert [gpu_check.tp_for(n) for n in (1, 2, 3, 4, 7, 8, 16)] == [1, 2, 2, 4, 4, 8, 8]


def test_refuses_without_cuda_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_status", lambda: (0, "no CUDA device here"))
    monkeypatch.setattr(gpu_check, "_launch", lambda *a, **k: pytest.fail("a check ran without CUDA"))
    assert gpu_check.main([]) == 1
    assert "Nothing was run" in capsys.readouterr().err


def test_shell_entry_point_refuses_on_this_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = dict(os.environ, PYTHON=str(Path(os.sys.executable)))
    proc = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "sees no CUDA device" in proc.stderr and "Nothing was run" in proc.stderr


def test_rl_check_reward_is_a_score_that_differs_between_responses():
    scores = [gpu_check.byte_value_score(r, {}) for r in ("", "AAAA", "zzzz", "\ufffd\ufffd", "A\ufffd")]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] == 0.0 and scores[3] == 1.0 and scores[1] < scores[4] < scores[3]
    assert scores[1] != scores[2]


def test_rl_check_worker_runs_and_asserts_on_the_cpu_runtime(tmp_path):
    """The rl check as the script launches it (a worker process, its result line and log), on
    the CPU runtime: a GPU session should not be the first to find the check broken. Two RL steps
    of the small model; frozen rows must stay put and kept rows must move."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the worker would run there")
    opts = gpu_check.Options(steps=2, timeout=300, log_dir=str(tmp_path / "logs"))
    row = gpu_check._launch("rl_tp1", 1, opts, str(tmp_path))
    assert row["status"] == "PASS", row
    assert "frozen rows bit-identical" in row["detail"] and "kept rows moved in 8/8" in row["detail"], row
    assert "GPU_CHECK_RESULT" in (tmp_path / "logs" / "rl_tp1.rank0.log").read_text()


def test_optimizer_overhead_check_runs_on_the_cpu_runtime(tmp_path):
    """The optimizer_overhead checks' code (timed steps, then the synchronised phase split) on the
    CPU runtime, with gpu_check's small model in place of the Qwen3-0.6B shape and a scaled-down
    Llama-3-70B rank (two engines of either would not fit this machine's memory)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check runs there itself")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from megatron_longact import gpu_check\n"
        "gpu_check.QWEN3_0_6B = gpu_check.SMALL\n"
        "row = gpu_check._check_optimizer_overhead(gpu_check.Options(seq=128, iters=2), Path(sys.argv[1]))\n"
        "print('ROW', row['status'], row['detail'])\n"
        "gpu_check.LLAMA3_70B_TP8_PP8_RANK = dict(gpu_check.LLAMA3_70B_TP8_PP8_RANK, num_layers=2,\n"
        "    hidden_size=256, ffn_hidden_size=128, num_attention_heads=4, head_dim=32)\n"
        "row = gpu_check._check_optimizer_overhead_70b(gpu_check.Options(seq=4096, iters=2),\n"
        "                                              Path(sys.argv[1]))\n"
        "print('ROW70', row['status'], row['detail'])\n")
    env = dict(os.environ, MEGATRON_LONGACT_CPU="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(gpu_check._free_port()),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    row = next((line for line in proc.stdout.splitlines() if line.startswith("ROW ")), None)
    assert proc.returncode == 0 and row is not None, proc.stderr[-3000:]
    assert row.startswith("ROW PASS") and "ratio" in row, row
    for phase in ("end_step", "plans", "zero", "gather", "torch step", "scatter", "plain's torch step"):
        assert f"{phase} " in row, (phase, row)
    # the Llama-3-70B rank's check: the same code on its model (scaled down here), one query group
    row70 = next((line for line in proc.stdout.splitlines() if line.startswith("ROW70 ")), None)
    assert row70 is not None, proc.stdout[-2000:]
    assert row70.startswith("ROW70 PASS Llama-3-70B TP=8 PP=8 rank") and "ratio" in row70, row70
