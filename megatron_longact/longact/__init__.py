"""LongAct: saliency statistics of Q/K channels, global top-k masks and their application."""

from megatron_longact.longact.config import LongActConfig  # noqa: F401
from megatron_longact.longact.controller import LongAct, LongActGroups, megatron_groups  # noqa: F401
from megatron_longact.longact.layout import QKGeometry  # noqa: F401
from megatron_longact.longact.selection import keep_count, select_channels  # noqa: F401
