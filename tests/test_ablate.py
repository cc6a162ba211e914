"""longact-ablate: per-run values, the paired comparison, reuse of finished runs and warm starts."""

import json
from pathlib import Path

import pytest

from megatron_longact.cli import ablate

ROOT = Path(__file__).resolve().parents[1]


def _history(rewards, scores):
    return {"history": [{"rl/reward": r} for r in rewards],
            "evaluation": {"ruler": {"tasks": {"niah_single_1": scores}}}}


def test_run_values_tail_and_lengths():
    v = ablate.run_values(_history([0.0, 1.0, 0.5, 0.25], {"160": 50.0, "320": 12.5}), tail=2)
    assert v == {"final_reward": pytest.approx(0.375), "niah_single_1@160": 50.0,
                 "niah_single_1@320": 12.5}


def _runs():
    vals = {("topk", 1): 0.5, ("topk", 2): 0.4, ("topk", 3): 0.3,
            ("none", 1): 0.4, ("none", 2): 0.6, ("none", 3): 0.1,
            ("random", 1): 0.5}
    return [{"strategy": s, "seed": seed, "dir": f"{s}_seed{seed}", "values": {"final_reward": v}}
            for (s, seed), v in vals.items()]


def test_paired_differences_are_per_seed():
    p = ablate.paired(_runs(), "topk", "none", "final_reward")
    assert p["seeds"] == [1, 2, 3]
    assert p["diffs"] == pytest.approx([0.1, -0.2, 0.2])
    assert p["mean"] == pytest.approx(0.1 / 3)
    assert p["std"] == pytest.approx(0.2081666, rel=1e-5)
    assert (p["ahead"], p["tied"]) == (2, 0)
    # Only the seeds both strategies finished are paired.
    p = ablate.paired(_runs(), "topk", "random", "final_reward")
    assert p["seeds"] == [1] and p["diffs"] == [0.0] and p["tied"] == 1
    assert ablate.paired(_runs(), "topk", "bottomk", "final_reward") is None


def test_summary_marks_partial_results():
    lines, result = ablate.summarize(_runs(), ["none", "topk", "random", "bottomk"], [1, 2, 3],
                                     "topk", "header")
    text = "\n".join(lines)
    assert "Runs finished: 7 of 12. (partial results)" in text
    assert "| topk - none | +0.033 +- 0.208 (2/3) |" in text
    assert "bottomk" not in text.split("Paired")[0].split("| --- |")[1]
    assert result["table"]["none"]["seeds"] == [1, 2, 3]
    assert ("- topk vs none: final reward: within the spread (+0.0333, std 0.208 over 3 seeds, "
            "ahead in 2).") in text
    assert "- topk vs random: final reward: +0 on one seed (no spread to compare with)." in text


def test_commentary_names_a_difference_larger_than_the_spread():
    runs = [{"strategy": s, "seed": seed, "values": {"final_reward": v}}
            for s, seed, v in (("topk", 1, 0.5), ("topk", 2, 0.6), ("none", 1, 0.3), ("none", 2, 0.3))]
    lines, _ = ablate.summarize(runs, ["none", "topk"], [1, 2], "topk", "header")
    assert "- topk vs none: final reward: topk above by 0.25 (std 0.0707 over 2 seeds, ahead in 2)." in lines


def test_finished_runs_are_read_not_rerun_and_warm_start_is_shared(tmp_path, monkeypatch):
    """Runs with a history.json are not started again; the SFT warm start runs once per seed and
    every strategy of that seed starts from a copy of it."""
    out = tmp_path / "abl"
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        args = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))
        run_dir = Path(args["output.dir"])
        if args.get("train.steps") == "0":  # the warm start: write a checkpoint at step 3
            ckpt = run_dir / "checkpoints" / "iter_0000003"
            ckpt.mkdir(parents=True)
            (ckpt / "weights.bin").write_text(f"seed {args['train.seed']}")
        else:
            copied = run_dir / "checkpoints" / "iter_0000003" / "weights.bin"
            assert copied.read_text() == f"seed {args['train.seed']}"
            assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3\n"
            reward = {"none": 0.2, "topk": 0.3}[args["longact.strategy"]] + int(args["train.seed"])
            (run_dir / "history.json").write_text(json.dumps(_history([reward], {"160": 10.0})))
        return type("R", (), {"returncode": 0})()

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    argv = ["--config", str(ROOT / "configs/demo_cpu.yaml"), "--strategies", "none,topk",
            "--seeds", "1,2", "--out", str(out), "--tail", "1", "sft.steps=3"]
    assert ablate.main(argv) == 0
    warm = [c for c in calls if "train.steps=0" in c]
    assert len(warm) == 2 and len(calls) == 6
    result = json.loads((out / "results.json").read_text())
    p = result["paired"]["topk-none"]["final_reward"]
    assert p["diffs"] == pytest.approx([0.1, 0.1]) and p["ahead"] == 2
    calls.clear()
    assert ablate.main(argv) == 0
    assert calls == []  # everything finished: nothing rerun
    assert "Runs finished: 4 of 4." in (out / "results.md").read_text()
    # --report-only: a missing run is reported as missing, never started.
    import shutil

    shutil.rmtree(out / "topk_seed2")
    assert ablate.main(argv + ["--report-only"]) == 0
    assert calls == []
    text = (out / "results.md").read_text()
    assert "Runs finished: 3 of 4. (partial results)" in text and "| topk | 1 |" in text


def test_reference_must_be_a_strategy(capsys, monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("a run was started although --reference is bad")

    monkeypatch.setattr(ablate.subprocess, "run", must_not_run)
    assert ablate.main(["--config", str(ROOT / "configs/demo_cpu.yaml"), "--strategies",
                        "none,random"]) == 2
    assert "--reference: got 'topk'" in capsys.readouterr().err
