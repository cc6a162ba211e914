"""``longact-eval [--config <run.yaml>] (--checkpoint DIR | --init random) [options] [key=value ...]``:
evaluate a model on RULER or LongBench v2 with greedy batched generation.

The run config gives the model and the parallel layout (as for ``longact-train``); with a trainer
checkpoint (a checkpoint folder or a checkpoint root, whose newest valid checkpoint is taken)
``--config`` may be left out: the run config saved beside the checkpoints is used. The evaluation
settings form :class:`EvalConfig`. They are filled, in increasing precedence, from the run config's
data settings (tokenizer, prompt template, RULER template and needle digits: the model is evaluated
the way it was trained), an optional ``eval:`` section of the YAML, the command-line flags, and
dotted overrides starting with ``eval.`` (e.g. ``eval.prompt.chat=none``); every other override
goes to the run config. Data-parallel ranks
split the records; tensor- and pipeline-parallel ranks generate together (``generation.generate``).
Rank 0 writes ``results.md`` and ``results.json`` (``tasks.suite.write_report``) and, with
``--tb-dir``, TensorBoard scalars.

Everything that can fail on user input (config, layout, tokenizer, data files, record lengths, the
weights source) is checked before any process group is created or any model is built.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_longact.config import ConfigError, check_choice, check_positive, deep_merge, from_dict, \
    parse_overrides, to_dict
from megatron_longact.data.tokenizer import PromptConfig, TokenizerConfig
from megatron_longact.errors import ArgumentParser, cli_entry
from megatron_longact.run_config import RunConfig, load_run_config, read_run_yaml
from megatron_longact.runtime import initialize, read_dist_env
from megatron_longact.tasks.suite import SuiteConfig


@dataclass
class EvalConfig:
    """What to evaluate and how (the model and layout come from the run config)."""

    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """Benchmark: ``ruler`` (generated at ``suite.ruler.lengths``) or ``longbench-v2``."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt rendering; use the values the model was trained with."""
    init: Literal["checkpoint", "random"] = "checkpoint"
    """Weights: ``checkpoint`` loads ``checkpoint``; ``random`` uses the layout-independent reference
    initialization (smoke tests of the pipeline, scores are meaningless)."""
    checkpoint: str | None = None
    """Weights: a ``longact-convert hf-to-mcore`` folder (its stored model shape must match the run
    config's model) or a trainer checkpoint (folder or checkpoint root)."""
    seed: int | None = None
    """Seed of the random initialization; None uses train.seed."""
    batch_size: int = 8
    """Prompts per generation call on each data-parallel rank."""
    max_new_tokens: int | None = None
    """Upper bound on each record's generation budget; None keeps the record's own."""
    kv_cache: bool = True
    """Generate with megatron's static KV cache; false recomputes the full forward per token."""
    out_dir: str | None = None
    """Where results.md / results.json go; None: ``<output.dir>/eval``."""
    tb_dir: str | None = None
    """TensorBoard log folder for the scores; None writes none."""

    def __post_init__(self) -> None:
        check_choice("eval.init", self.init, ("checkpoint", "random"))
        if self.init == "checkpoint" and not self.checkpoint:
            raise ConfigError("eval.checkpoint: required (--checkpoint DIR), or use --init random "
                              "for a run with random weights")
        if self.init == "random" and self.checkpoint:
            raise ConfigError("eval.init: 'random' and a checkpoint were both given; choose one")
        check_positive("eval.batch_size", self.batch_size)
        check_positive("eval.max_new_tokens", self.max_new_tokens)


def parse_args(argv=None):
    p = ArgumentParser(prog="longact-eval", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config (YAML path or bundled name); optional with a trainer "
                                     "checkpoint, whose saved run config is used")
    p.add_argument("--checkpoint", help="trainer checkpoint (folder or checkpoint root) or a "
                                        "longact-convert hf-to-mcore folder")
    p.add_argument("--init", choices=("checkpoint", "random"),
                   help="'random': reference-initialized weights instead of a checkpoint")
    p.add_argument("--suite", choices=("ruler", "longbench-v2"), help="benchmark (default ruler)")
    p.add_argument("--lengths", help="RULER target lengths in tokens, comma-separated, e.g. 256,512")
    p.add_argument("--tasks", help="RULER tasks, comma-separated (default: the 11 synthetic tasks)")
    p.add_argument("--num-samples", type=int, help="RULER samples per task and length")
    p.add_argument("--template", choices=("full", "compact"), help="RULER prompt wording")
    p.add_argument("--data", help="LongBench v2 data.json (or .jsonl)")
    p.add_argument("--batch-size", type=int, help="prompts per generation call per data-parallel rank")
    p.add_argument("--max-new-tokens", type=int, help="cap on each record's generation budget")
    p.add_argument("--out", help="output folder for results.md and results.json")
    p.add_argument("--tb-dir", help="TensorBoard folder for the scores")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides: eval.<field>=... for EvalConfig, anything else for the run config")
    return p.parse_args(argv)


def _int_list(name: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: got {text!r}, expected comma-separated integers such as 256,512") from None
    if not values:
        raise ConfigError(f"{name}: empty; give at least one value")
    return values


def _flags_to_eval_dict(args) -> dict:
    out: dict = {}
    suite: dict = {}
    ruler: dict = {}
    if args.suite:
        suite["name"] = args.suite
    if args.lengths:
        ruler["lengths"] = _int_list("--lengths", args.lengths)
    if args.tasks:
        ruler["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.num_samples is not None:
        ruler["num_samples"] = args.num_samples
    if args.template:
        ruler["template"] = args.template
    if ruler:
        suite["ruler"] = ruler
    if args.data:
        suite["longbench_v2"] = {"path": args.data}
    if suite:
        out["suite"] = suite
    if args.checkpoint:
        out["checkpoint"] = args.checkpoint
    if args.init:
        out["init"] = args.init
    for key, value in (("batch_size", args.batch_size), ("max_new_tokens", args.max_new_tokens),
                       ("out_dir", args.out), ("tb_dir", args.tb_dir)):
        if value is not None:
            out[key] = value
    return out


def _defaults_from_run(cfg: RunConfig) -> dict:
    """Evaluation settings the run trained with: tokenizer, prompt rendering, RULER wording."""
    ruler = cfg.data.ruler
    return {"tokenizer": to_dict(cfg.data.tokenizer), "prompt": to_dict(cfg.data.prompt),
            "suite": {"ruler": {"template": ruler.template, "number_digits": ruler.number_digits}}}


@dataclass
class Plan:
    """Everything checked before start-up."""

    cfg: RunConfig
    ecfg: EvalConfig
    parallel: object
    tokenizer: object
    records: list
    out_dir: Path
    load_checkpoint: object | None


def _checkpoint_loader(path: str, model_cfg, trained: Path | None = None):
    """Check that ``path`` is a weights checkpoint (``convert.checkpoint``) for this model's shape,
    or take the trainer checkpoint ``trained``, and return the function that loads it into a
    built GPTModel (any layout)."""
    from megatron_longact.convert.checkpoint import check_compatible, load_dist_weights, \
        load_model_weights, read_meta

    if trained is not None:
        return lambda gpt_model: load_dist_weights(gpt_model, trained)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: not a directory; expected a trainer checkpoint "
                                "or a folder written by longact-convert hf-to-mcore")
    stored, _ = read_meta(path)
    check_compatible(stored, model_cfg, path)
    return lambda gpt_model: load_model_weights(gpt_model, path, model_cfg)


def prepare(argv=None) -> Plan:
    """Parse, validate and build the records (deterministic, identical on every rank); no process
    group and no model yet."""
    from megatron_longact.data.tokenizer import encode_prompt_text, load_tokenizer, render_prompt
    from megatron_longact.tasks.suite import build_suite

    from megatron_longact.trained import find_trainer_checkpoint, run_config_for

    args = parse_args(argv)
    run_overrides = [o for o in args.overrides if not o.startswith("eval.")]
    eval_overrides = [o[len("eval."):] for o in args.overrides if o.startswith("eval.")]
    trained = find_trainer_checkpoint(args.checkpoint) if args.checkpoint else None
    if trained is not None:
        args.config = run_config_for(trained, args.config, "longact-eval")
        args.checkpoint = str(trained)
    elif not args.config:
        raise ConfigError("--config: required (the run config naming the model), unless --checkpoint "
                          "is a trainer checkpoint with its saved run config")
    raw = read_run_yaml(args.config)
    eval_raw = raw.pop("eval", None) or {}
    if not isinstance(eval_raw, dict):
        raise ConfigError(f"eval: expected a mapping in {args.config}")
    cfg = load_run_config(None, run_overrides, data=raw)
    eval_raw = deep_merge(deep_merge(deep_merge(_defaults_from_run(cfg), eval_raw), _flags_to_eval_dict(args)),
                          parse_overrides(eval_overrides))
    ecfg = from_dict(EvalConfig, eval_raw, "eval")

    env = read_dist_env()
    parallel = cfg.parallel.resolve(env.world_size)
    cfg.model.check_layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                           parallel.context_parallel_size)
    if parallel.context_parallel_size > 1:
        raise ConfigError("parallel.context_parallel_size: generation supports 1 only")
    from megatron_longact.rollout.base import check_rollout

    check_rollout(cfg)  # the run's rollout.engine generates here too
    load = _checkpoint_loader(ecfg.checkpoint, cfg.model, trained) if ecfg.init == "checkpoint" else None

    tokenizer = load_tokenizer(ecfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"eval.tokenizer: vocabulary of {tokenizer.vocab_size} tokens is larger than "
                          f"model.vocab_size={cfg.model.vocab_size}")
    if ecfg.tokenizer.kind == "byte" and cfg.model.vocab_size > 4 * tokenizer.vocab_size:
        print(f"longact-eval: warning: the byte tokenizer ({tokenizer.vocab_size} tokens) with a model "
              f"of vocab_size {cfg.model.vocab_size}; set data.tokenizer in the run config (or "
              "eval.tokenizer) to the model's own tokenizer", file=sys.stderr)
    records = build_suite(ecfg.suite, tokenizer, ecfg.prompt)
    if not records:
        raise ConfigError(f"eval.suite: {ecfg.suite.name} produced no records")
    limit = cfg.model.max_position_embeddings
    for record in records:
        budget = int(record["max_new_tokens"])
        if ecfg.max_new_tokens:
            budget = min(budget, ecfg.max_new_tokens)
        n = len(encode_prompt_text(render_prompt(record, tokenizer, ecfg.prompt), tokenizer, ecfg.prompt))
        if n + budget > limit:
            raise ConfigError(f"record {record['id']}: {n} prompt tokens + {budget} new tokens exceed "
                              f"model.max_position_embeddings={limit}; evaluate shorter lengths")
    out_dir = Path(ecfg.out_dir) if ecfg.out_dir else Path(cfg.output.dir) / "eval"
    return Plan(cfg, ecfg, parallel, tokenizer, records, out_dir, load)


def run(plan: Plan, runtime) -> dict | None:
    """Build the model, generate for this data-parallel rank's records, gather and (rank 0) write
    the report. Returns the paths written on rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps

    from megatron_longact.data.tokenizer import encode_prompt_text
    from megatron_longact.generation import SamplingConfig
    from megatron_longact.models.builder import build_model
    from megatron_longact.rollout import build_engine
    from megatron_longact.runtime import collectives
    from megatron_longact.tasks.suite import EvalResults, evaluate, summarize, write_report
    from megatron_longact.training.engine import reference_initialize

    cfg, ecfg, tokenizer = plan.cfg, plan.ecfg, plan.tokenizer
    rank0 = runtime.rank == 0
    model, tconfig = build_model(cfg.model, runtime.parallel)
    if plan.load_checkpoint is None:
        reference_initialize(model, cfg.model, ecfg.seed if ecfg.seed is not None else cfg.train.seed)
    else:
        plan.load_checkpoint(model)
    if tconfig.bf16 or tconfig.fp16:
        # As in training (models.builder.wrap_for_training): Float16Module casts every weight,
        # norms included, to the half dtype, so evaluation runs the numerics the model trained with.
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tconfig, model)
    engine = build_engine(cfg.rollout, model=model, model_cfg=cfg.model, tokenizer=tokenizer,
                          max_model_len=cfg.model.max_position_embeddings,
                          work_dir=plan.out_dir / "rollout", seed=cfg.train.seed, kv_cache=ecfg.kv_cache)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = len(plan.records)
    local = plan.records[dp_rank * n // dp:(dp_rank + 1) * n // dp]

    def generate_fn(texts, max_new_tokens):
        budget = min(max_new_tokens, ecfg.max_new_tokens) if ecfg.max_new_tokens else max_new_tokens
        prompts = [encode_prompt_text(t, tokenizer, ecfg.prompt) for t in texts]
        out = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=budget))
        return [tokenizer.decode(out.response_ids(i)) for i in range(len(texts))]

    start = time.monotonic()

    def progress(done, total):
        if rank0:
            print(f"eval: {done}/{total} records on data-parallel rank 0 "
                  f"({time.monotonic() - start:.1f}s)", flush=True)

    try:
        results = evaluate(local, generate_fn, tokenizer=tokenizer, prompt=ecfg.prompt,
                           batch_size=ecfg.batch_size, pass_max_new_tokens=True, progress=progress)
    finally:
        engine.close()
    samples = results.samples
    if dp > 1:
        parts = collectives.all_gather_object(samples, ps.get_data_parallel_group())
        samples = [s for part in parts for s in part]
    if not rank0:
        return None
    results = EvalResults(samples=samples, summary=summarize(samples))
    extra = {
        "init": ecfg.init,
        "checkpoint": ecfg.checkpoint,
        "layout": {"tp": runtime.parallel.tensor_model_parallel_size,
                   "pp": runtime.parallel.pipeline_model_parallel_size,
                   "dp": runtime.parallel.data_parallel_size},
        "model": to_dict(cfg.model),
        "eval": to_dict(ecfg),
        "seconds": round(time.monotonic() - start, 2),
    }
    title = f"Evaluation: {ecfg.suite.name} ({ecfg.checkpoint or 'random init'})"
    return write_report(results, plan.out_dir, log_dir=ecfg.tb_dir, title=title, extra=extra)


@cli_entry("longact-eval")
def main(argv=None) -> int:
    from megatron_longact.checkpoint import CheckpointError

    try:
        plan = prepare(argv)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError, CheckpointError) as exc:
        # ConfigError, RecordError and TargetTooSmall are ValueErrors with a message naming the input.
        print(f"longact-eval: {exc}", file=sys.stderr)
        return 2
    runtime = initialize(plan.parallel, seed=plan.cfg.train.seed)
    if runtime.rank == 0:
        p = runtime.parallel
        print(f"longact-eval: suite={plan.ecfg.suite.name} records={len(plan.records)} "
              f"weights={plan.ecfg.checkpoint or 'random init'} layout tp={p.tensor_model_parallel_size} "
              f"pp={p.pipeline_model_parallel_size} dp={p.data_parallel_size} device={runtime.device}",
              flush=True)
    try:
        paths = run(plan, runtime)
    finally:
        from megatron_longact.runtime import destroy

        destroy()
    if paths is not None:
        import json

        summary = json.loads(paths["json"].read_text())["summary"]
        for suite, s in summary.items():
            print(f"{suite}: overall {s.get('overall')}", flush=True)
        print(f"wrote {paths['markdown']} and {paths['json']}"
              + (f"; TensorBoard scalars in {paths['tensorboard']}" if "tensorboard" in paths else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
