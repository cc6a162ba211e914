"""``longact-plan --config <yaml> --nodes N --gpus-per-node G [key=value ...]``: dry-run planner.

Checks the parallel layout against the model and the world size and prints the per-GPU memory
estimate and the step numbers to check before queueing (see :mod:`megatron_longact.plan` for the
memory model). Needs no GPU and starts no processes.

Exit status: 0 the layout is valid and fits, 1 valid but over the device memory, 2 invalid (or
refused, e.g. native generation under context parallelism: the plan is printed, then one line on
stderr says why).
"""

from __future__ import annotations

import json
import sys

from megatron_longact.config import ConfigError
from megatron_longact.errors import ArgumentParser, cli_entry, finite_float
from megatron_longact.plan import PlanOptions, format_plan, make_plan
from megatron_longact.run_config import load_run_config


def parse_args(argv=None):
    p = ArgumentParser(prog="longact-plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True,
                   help="run config: a YAML path or a bundled example name such as demo_cpu")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=finite_float, default=PlanOptions.gpu_memory_gib,
                   help="device memory (default 80, H100 SXM)")
    p.add_argument("--reserve-gib", type=finite_float, default=PlanOptions.reserve_gib,
                   help="CUDA context, NCCL buffers, workspaces (default 4)")
    p.add_argument("--fragmentation", type=finite_float, default=PlanOptions.fragmentation,
                   help="fraction of the device kept free (default 0.10)")
    p.add_argument("--fp8", action="store_true", help="Transformer Engine FP8 linear layers")
    p.add_argument("--reference-model", action="store_true",
                   help="keep a frozen KL reference policy on the GPUs (implied by rl.kl_coef > 0)")
    p.add_argument("--rollout-sequences", type=int, default=0,
                   help="sequences generated at once per DP replica (KV cache); default 0")
    p.add_argument("--no-longact", action="store_true", help="plan without LongAct's state")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.context_parallel_size=4")
    return p.parse_args(argv)


@cli_entry("longact-plan")
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = load_run_config(args.config, args.overrides)
        opts = PlanOptions(gpu_memory_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib,
                           fragmentation=args.fragmentation, fp8=args.fp8,
                           reference_model=args.reference_model,
                           rollout_sequences=args.rollout_sequences,
                           longact_enabled=not args.no_longact)
        plan = make_plan(run, args.nodes, args.gpus_per_node, opts)
    except ConfigError as exc:
        print(f"longact-plan: invalid layout: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {"fits": plan.fits, "world_size": plan.world_size,
               "layout": {"tp": plan.tp, "pp": plan.pp, "cp": plan.cp, "dp": plan.dp},
               "usable_gib": plan.usable_bytes / 2**30,
               "stages": [{"stage": s.stage, "parameters": s.parameters, "peak_gib": s.peak / 2**30,
                           "static_gib": {k: v / 2**30 for k, v in s.static.items()},
                           "phases_gib": {k: v / 2**30 for k, v in s.phases.items()}}
                          for s in plan.stages],
               "numbers": plan.numbers, "warnings": plan.warnings, "refusals": plan.refusals}
        print(json.dumps(out, indent=2))
    else:
        print(f"longact-plan: {args.config} on {args.nodes} x {args.gpus_per_node} GPUs"
              f"{' (FP8)' if args.fp8 else ''}{' (+ reference model)' if args.reference_model else ''}")
        print(format_plan(plan))
    if plan.refusals:
        print(f"longact-plan: refused: {plan.refusals[0]}", file=sys.stderr)
        return 2
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
