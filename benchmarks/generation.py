"""Generation speed side by side in one process: our native megatron generation, Hugging Face
``transformers`` ``generate`` with its KV cache, and (``--model vllm``) the colocated vLLM engine,
all on the same weights and the same rows.

The model is the one of ``benchmarks/vs_trl.py``: a Hugging Face model built from the demo's
model config with a fixed seed, fp32, converted to a megatron checkpoint that our trainer loads
(``--model megatron``: the CPU demo's tiny model; ``--model vllm``: the vLLM demo's, whose head
size vLLM's CPU attention accepts). The rows are an RL step's: ``--prompts`` prompts of the demo's
task in the trainer's order, each repeated ``--group`` times (64 rows by default, prompt lengths
differ by a few tokens). Every side samples at temperature 1 with no top-k/top-p and no stop token,
so each produces exactly ``--new-tokens`` tokens per row; Hugging Face gets the rows left-padded
with an attention mask (its usual batched generation).

Ours runs twice: as the trainer calls it (the prefill runs once per distinct prompt and the KV
cache is copied to the prompt's repeats, ``share_prompts``) and with a prefill of every row, which
is what ``generate`` of transformers does, for a like-for-like per-row figure.

Prints the median tokens/s of each side over ``--repeats`` alternated runs and the ratios to
Hugging Face (target: ours >= 1.0).

Run: python benchmarks/generation.py [--model megatron|vllm] [--new-tokens 6,32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from megatron_longact.errors import at_least

    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=("megatron", "vllm"), default="megatron",
                   help="whose demo model: megatron (tiny) or vllm (adds the vLLM engine)")
    p.add_argument("--prompts", type=at_least(1), default=8)
    p.add_argument("--group", type=at_least(1), default=8)
    p.add_argument("--new-tokens", default="6,32", help="comma-separated response lengths")
    p.add_argument("--repeats", type=at_least(1), default=5)
    args = p.parse_args()
    try:
        new_tokens = [at_least(1)(n) for n in args.new_tokens.split(",") if n]
    except argparse.ArgumentTypeError as e:
        p.error(f"--new-tokens: {e}")
    if not new_tokens:
        p.error("--new-tokens: got no length, expected comma-separated integers >= 1")

    import torch
    import transformers
    import vs_trl

    from megatron_longact.generation import SamplingConfig, generate
    from megatron_longact.runtime import destroy, initialize
    from megatron_longact.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vs_trl.prepare(work, args.model)
        cfg = vs_trl._run_config(work, 1, True, str(work / "out"), args.model)
        runtime = initialize(cfg.parallel, seed=cfg.train.seed)
        try:
            trainer = Trainer(cfg, runtime)
            tok = trainer.tokenizer
            records = vs_trl._records_in_order(cfg, tok, 1)[:args.prompts]
            prompts = [trainer._prompt(r) for r in records for _ in range(args.group)]
            rows = len(prompts)
            model = trainer.engine.model[0]
            hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
            width = max(map(len, prompts))
            ids = torch.full((rows, width), tok.pad_id)
            att = torch.zeros(rows, width, dtype=torch.long)
            for i, prompt in enumerate(prompts):
                ids[i, width - len(prompt):] = torch.tensor(prompt)
                att[i, width - len(prompt):] = 1

            engines = {}
            for n in new_tokens:
                sampling = SamplingConfig(temperature=1.0, max_new_tokens=n, seed=1)

                def ours(sampling=sampling, share=True):
                    # eos_id -1: no stop token, every row makes max_new_tokens tokens.
                    out = generate(model, prompts, sampling, eos_id=-1, pad_id=tok.pad_id,
                                   vocab_size=tok.vocab_size, sample_ids=list(range(rows)),
                                   share_prompts=share)
                    return int(out.response_lengths.sum())

                def theirs(n=n):
                    with torch.no_grad():
                        out = hf.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0,
                                          top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                                          pad_token_id=tok.pad_id, eos_token_id=None)
                    return int(out.shape[0] * (out.shape[1] - width))

                sides = {"ours (megatron native)": ours,
                         "ours, prefill every row": partial(ours, share=False),
                         "transformers generate": theirs}
                if args.model == "vllm":
                    if "vllm" not in engines:
                        from megatron_longact.rollout import RolloutConfig, build_engine

                        no_stop = type("Tok", (), dict(eos_id=-1, pad_id=tok.pad_id, vocab_size=tok.vocab_size,
                                                       bos_id=None))()
                        engines["vllm"] = build_engine(RolloutConfig(engine="vllm"), model=model,
                                                       model_cfg=cfg.model, tokenizer=no_stop,
                                                       max_model_len=cfg.model.max_position_embeddings,
                                                       work_dir=work, seed=0)

                    def vllm(sampling=sampling):
                        out = engines["vllm"].generate(prompts, sampling, sample_ids=list(range(rows)))
                        return int(out.response_lengths.sum())

                    sides["vLLM engine"] = vllm
                for f in sides.values():  # warm-up
                    f()
                rates = {name: [] for name in sides}
                for r in range(args.repeats):
                    for name, f in list(sides.items())[::(-1 if r % 2 else 1)]:
                        t0 = time.perf_counter()
                        made = f()
                        rates[name].append(made / (time.perf_counter() - t0))
                med = {name: statistics.median(v) for name, v in rates.items()}
                hf_rate = med["transformers generate"]
                print(f"{rows} rows ({args.prompts} prompts x {args.group}) of {min(map(len, prompts))}-"
                      f"{width} prompt tokens, {n} new tokens each, fp32, {torch.get_num_threads()} threads, "
                      f"median of {args.repeats} alternated runs:")
                for name, rate in med.items():
                    print(f"  {name:26s} {rate:9.1f} tok/s   {rate / hf_rate:5.2f}x transformers")
            for engine in engines.values():
                engine.close()
        finally:
            destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
