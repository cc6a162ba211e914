"""``rollout.engine: vllm_server`` against a real vLLM OpenAI-compatible server on 127.0.0.1,
started once for the module and stopped by its PID: one RL step with a weight push; the server's
greedy responses equal megatron's before the step and again after the push, and they change."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dist_harness import free_port, run_distributed
from tests.test_rollout_vllm import LOGPROB_TOL, _alive, _config, _model_cfg, _parity

if importlib.util.find_spec("vllm") is None and not os.environ.get("CI"):
    pytest.skip("vllm is not installed (pip install -e '.[vllm]'); CI always runs these tests",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (start-up takes about a minute on 2 cores)."""
    import torch
    import transformers

    from megatron_longact.rollout.vllm_engine import write_hf_config

    folder = tmp_path_factory.mktemp("server") / "model"
    write_hf_config(folder, _model_cfg(), eos_id=257, bos_id=256, dtype="float32")
    torch.manual_seed(0)  # weights unlike the policy's: the first push must replace them
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder)) \
        .save_pretrained(folder)
    port = free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind")
    log = open(folder.parent / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "1024", "--skip-tokenizer-init", "--logprobs-mode", "processed_logprobs"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {proc.returncode}: "
                                   f"{(folder.parent / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the vLLM server was not ready in 900 s")
                time.sleep(2)
        yield url
    finally:
        children = _descendants(proc.pid)  # vLLM's engine-core process and its workers
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(proc.pid) and not [p for p in children if _alive(p)]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _one_step(runtime, tmp, url):
    from megatron_longact.generation import SamplingConfig
    from megatron_longact.training.trainer import Trainer
    from tests.test_rollout_vllm import _probe_prompts

    cfg = _config(tmp, f"{tmp}/out", **{"rollout.engine": "vllm_server", "train.steps": 1,
                                        "rollout.server_urls": f"[{url}]"})
    trainer = Trainer(cfg, runtime)
    log = []
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    original_build = trainer._rollout_engine

    def build():
        fresh = trainer.rollout is None
        engine = original_build()
        if fresh:
            log.append(("built", _parity(trainer), engine.generate(_probe_prompts(), greedy).responses.tolist()))
            original_after = engine.after_update

            def after_update(done):
                log.append(("stale", _parity(trainer), None))
                synced = original_after(done)
                log.append(("pushed", _parity(trainer),
                            engine.generate(_probe_prompts(), greedy).responses.tolist(), synced,
                            engine.pushes))
                return synced

            engine.after_update = after_update
        return engine

    trainer._rollout_engine = build
    history = trainer.run()
    return history, log


def test_one_rl_step_against_a_real_server(tmp_path, server):
    history, log = run_distributed(_one_step, args=(str(tmp_path), server), timeout=900)[0]
    assert [h["step"] for h in history] == [0]
    assert history[0]["rollout/mismatch_max"] < LOGPROB_TOL
    (_, built_parity, before), (_, stale_parity, _), (_, pushed_parity, after, synced, pushes) = log
    assert built_parity is True          # the first push replaced the server's own weights
    assert stale_parity is False         # the step moved the policy ...
    assert synced is True and pushes == 2
    assert pushed_parity is True         # ... and the push brought the server along
    assert before != after               # responses changed after the push
