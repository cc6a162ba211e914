"""Long-context tasks with verifiable answers: RULER-style generators, LongBench v2, rewards, evaluation.

Every task produces records with the fields of ``data.jsonl.TASK_RECORD_FIELDS``; the same record
feeds RL rollouts (``rewards.Reward``) and evaluation (``suite.evaluate``).
"""

from megatron_longact.tasks.longbench_v2 import (  # noqa: F401
    LongBenchV2Config,
    build_longbench_v2_records,
    extract_choice,
    load_longbench_v2,
)
from megatron_longact.tasks.rewards import Reward, RewardConfig, compute_rewards, task_score  # noqa: F401
from megatron_longact.tasks.ruler import (  # noqa: F401
    RULER_TASKS,
    RulerConfig,
    generate_ruler,
    generate_sample,
    get_task,
)
from megatron_longact.tasks.suite import (  # noqa: F401
    EvalResults,
    SuiteConfig,
    build_suite,
    evaluate,
    write_report,
)
