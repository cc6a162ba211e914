"""Launch scripts: syntax, shellcheck, and what they would start (fake srun/torchrun/scontrol).

The fakes record their arguments and environment instead of starting anything; srun's fake runs
the command after its options (torchrun), so the test sees both levels of the launch. The real
planner runs in the preflight, so a config that stopped fitting would fail here too.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "launch" / "slurm"
SBATCH = sorted(SLURM.glob("*.sbatch"))
SCRIPTS = SBATCH + [SLURM / "common.sh", ROOT / "launch" / "local.sh"]
JOB_ID = 4242

FAKES = {
    "scontrol": """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a017\\ngpu-a018\\n'; exit 0; fi
saved=no; if [[ -f $FAKE_LOG/trainer.txt ]]; then saved=yes; fi
echo "$* trainer_saved=$saved" >> "$FAKE_LOG/scontrol.txt"
""",
    "srun": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
if [[ -n ${FAKE_SRUN_SLEEP:-} ]]; then
    sleep "$FAKE_SRUN_SLEEP" & child=$!
    trap 'kill $child; exit 143' TERM
    wait $child
fi
exec "$@"
""",
    "torchrun": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/torchrun.args"
env > "$FAKE_LOG/torchrun.env"
# FAKE_TRAINER: behave like the trainer asked to stop: wait for the stop file, "save", exit 0.
if [[ -n ${FAKE_TRAINER:-} ]]; then
    for _ in $(seq 600); do
        if [[ -e ${LONGACT_STOP_FILE:-/nonexistent} ]]; then
            echo "saved on $LONGACT_STOP_FILE" > "$FAKE_LOG/trainer.txt"; exit 0
        fi
        sleep 0.1
    done
    exit 1
fi
""",
}


def test_scripts_parse():
    assert len(SBATCH) == 6, SBATCH
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); bash -n still ran")
    proc = subprocess.run(["shellcheck", "-x", *[str(s.relative_to(ROOT)) for s in SCRIPTS]],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def fake_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in FAKES.items():
        path = bindir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    log.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(
        PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), PYTHON=sys.executable,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), LONGACT_ROOT=str(ROOT),
        RUN_DIR=str(tmp_path / "run"), SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NAME="test-job",
        SLURM_JOB_NODELIST="gpu-a[017-018]", SLURM_GPUS_ON_NODE="8",
    )
    return env, log, tmp_path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in _lines(path) if "=" in line)


@pytest.mark.parametrize("script,nodes,config", [
    ("qwen3_8b_grpo_1node.sbatch", 1, "configs/qwen3_8b_grpo.yaml"),
    ("qwen3_8b_grpo_2node.sbatch", 2, "configs/qwen3_8b_grpo.yaml"),
    ("qwen3_8b_dapo_1node.sbatch", 1, "configs/qwen3_8b_dapo.yaml"),
    ("llama3_70b_grpo_64k.sbatch", 8, "configs/llama3_70b_grpo_64k.yaml"),
    ("llama3_70b_grpo_64k_fp8.sbatch", 8, "configs/llama3_70b_grpo_64k_fp8.yaml"),
])
def test_sbatch_launch_line_and_environment(fake_env, script, nodes, config):
    env, log, tmp = fake_env
    env["SLURM_NNODES"] = str(nodes)
    env["LONGACT_ALLOW_BF16"] = "1"  # the FP8 script otherwise refuses (tested below)
    sbatch_nodes = [ln for ln in _lines(SLURM / script) if ln.startswith("#SBATCH --nodes=")]
    assert sbatch_nodes == [f"#SBATCH --nodes={nodes}"]
    proc = subprocess.run(["bash", str(SLURM / script), "train.steps=3"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FITS" in proc.stdout  # the preflight plan

    srun = _lines(log / "srun.args")
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert f"--output={tmp}/run/logs/{JOB_ID}-r0-node%n.log" in srun
    torchrun = _lines(log / "torchrun.args")
    port = 20000 + JOB_ID % 20000
    for arg in (f"--nnodes={nodes}", "--nproc-per-node=8", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=gpu-a017:{port}", f"--rdzv-id={JOB_ID}"):
        assert arg in torchrun, (arg, torchrun)
    module = torchrun.index("-m")
    assert torchrun[module:] == ["-m", "megatron_longact.cli.train", "--config", config,
                                 f"output.dir={tmp}/run", "train.steps=3"]
    launched = _env(log / "torchrun.env")
    assert launched["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert launched["MASTER_ADDR"] == "gpu-a017" and launched["MASTER_PORT"] == str(port)
    assert launched["NCCL_IB_TIMEOUT"] == "22" and launched["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert launched["NCCL_SOCKET_IFNAME"] == "^lo,docker0"
    if "fp8" in script:
        assert launched["NVTE_ASYNC_AMAX_REDUCTION"] == "1"
    plan = (tmp / "run" / "logs" / f"plan-{JOB_ID}-r0.txt").read_text()
    assert f"{nodes * 8} GPUs = {nodes} nodes x 8" in plan


def test_probe_script_runs_the_probe_on_one_gpu(fake_env):
    """Step 0 of the recipe: the probe sbatch runs longact-probe (for real, on a tiny local model)."""
    transformers = pytest.importorskip("transformers")
    env, log, tmp = fake_env
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    model.save_pretrained(tmp / "tiny")
    (tmp / "text.txt").write_text("a long enough text for two windows of 64 tokens. " * 8)
    env.update(MODEL=str(tmp / "tiny"), DATA=f"text:{tmp}/text.txt", LENGTHS="32,64", SAMPLES="2",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SLURM / "qwen3_8b_probe.sbatch"), "--tokenizer", "byte"],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _lines(log / "srun.args")[:4] == ["--ntasks=1", sys.executable, "-m",
                                             "megatron_longact.cli.probe"]
    assert "#SBATCH --gpus-per-node=1" in _lines(SLURM / "qwen3_8b_probe.sbatch")
    assert (tmp / "run" / "probe" / "probe.json").is_file()


def test_site_settings_are_kept(fake_env):
    env, log, tmp = fake_env
    env.update(SLURM_NNODES="1", NCCL_SOCKET_IFNAME="ib0", NCCL_IB_HCA="mlx5_0,mlx5_1",
               SRUN_EXTRA_ARGS="--container-image=nvcr.io/nvidia/pytorch:25.01-py3")
    proc = subprocess.run(["bash", str(SLURM / "qwen3_8b_grpo_1node.sbatch")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launched = _env(log / "torchrun.env")
    assert launched["NCCL_SOCKET_IFNAME"] == "ib0" and launched["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in _lines(log / "srun.args")


def test_fp8_config_turns_fp8_on():
    from megatron_longact.run_config import load_run_config

    fp8 = load_run_config(ROOT / "configs/llama3_70b_grpo_64k_fp8.yaml")
    bf16 = load_run_config(ROOT / "configs/llama3_70b_grpo_64k.yaml")
    assert fp8.model.fp8 == "hybrid" and bf16.model.fp8 == "none"
    assert fp8.parallel == bf16.parallel and fp8.model.params_dtype == "bf16"


def test_layout_that_does_not_match_the_allocation_stops_before_srun(fake_env):
    env, log, tmp = fake_env
    env["SLURM_NNODES"] = "3"  # 24 GPUs: not a multiple of TP 8 x PP 4 x CP 2 = 64
    proc = subprocess.run(["bash", str(SLURM / "llama3_70b_grpo_64k.sbatch")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not divide the world size 24" in proc.stderr
    assert not (log / "srun.args").exists()


def _start_job(env, tmp, log, marker="torchrun.args"):
    proc = subprocess.Popen(["bash", str(SLURM / "qwen3_8b_grpo_1node.sbatch")], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (log / marker).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{marker} was not written"
        time.sleep(0.2)
    time.sleep(0.5)
    return proc


def test_usr1_asks_the_trainer_to_save_then_requeues(fake_env):
    """USR1 reaches the trainer (through the stop file; torchrun does not forward USR1), the
    trainer saves and exits, and only then is the job requeued."""
    env, log, tmp = fake_env
    env.update(SLURM_NNODES="1", FAKE_TRAINER="1")
    stop_file = tmp / "run" / f".stop-{JOB_ID}"
    stop_file.parent.mkdir(parents=True)
    stop_file.write_text("left by the previous job\n")  # must not stop the new one at once
    proc = _start_job(env, tmp, log)
    try:
        assert proc.poll() is None and not (log / "trainer.txt").exists()
        assert _env(log / "torchrun.env")["LONGACT_STOP_FILE"] == str(stop_file)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert (log / "trainer.txt").read_text().strip() == f"saved on {stop_file}"
    assert _lines(log / "scontrol.txt") == [f"requeue {JOB_ID} trainer_saved=yes"]
    assert "SIGUSR1: time limit near; asking the trainer to save" in out
    assert not stop_file.exists()  # a requeued job starts clean


def test_term_stops_the_step(fake_env):
    env, log, tmp = fake_env
    env.update(SLURM_NNODES="1", FAKE_SRUN_SLEEP="60")
    proc = _start_job(env, tmp, log, "srun.args")
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out + err
    assert "SIGTERM: stopping the job step" in out
    assert not (log / "scontrol.txt").exists()


def test_local_launcher_uses_torchrun_standalone(fake_env):
    env, log, tmp = fake_env
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "4", "configs/demo_cpu.yaml",
                           "train.steps=2"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _lines(log / "torchrun.args") == [
        "--standalone", "--nproc-per-node", "4", "-m", "megatron_longact.cli.train",
        "--config", "configs/demo_cpu.yaml", "train.steps=2"]
