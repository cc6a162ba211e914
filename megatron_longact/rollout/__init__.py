"""Rollout engines: where responses are generated (``rollout.engine``); see docs/rollout.md."""

from megatron_longact.rollout.base import MegatronEngine, RolloutEngine, build_engine, finish_reasons
from megatron_longact.rollout.config import RolloutConfig

__all__ = ["MegatronEngine", "RolloutConfig", "RolloutEngine", "build_engine", "finish_reasons"]
