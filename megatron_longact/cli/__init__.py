"""The console scripts (longact-train, -eval, -convert, -plan, -ablate).

Importing this package hides a few warnings that megatron-core and torch print on every start and
that a user cannot act on (see ``_QUIET``), so that the project's own output is what a user
reads. ``LONGACT_SHOW_ALL_WARNINGS=1`` shows them again. The library itself filters nothing.
"""

import os
import warnings

# (category, message regex). Only messages about our dependencies' internals: deprecations inside
# megatron-core's own calls into torch, and the CPU fallbacks, which are expected where there is
# no CUDA (on a GPU machine the Transformer Engine / Apex notices stay visible).
_QUIET = [
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
    (FutureWarning, r"Please use DTensor instead"),
    (UserWarning, r"full scope is deprecated"),
]
_CPU_ONLY = [
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
]


def _quiet() -> None:
    if os.environ.get("LONGACT_SHOW_ALL_WARNINGS") == "1":
        return
    rules = list(_QUIET)
    try:
        import torch

        if not torch.cuda.is_available():
            rules += _CPU_ONLY
    except ImportError:
        pass
    for category, message in rules:
        warnings.filterwarnings("ignore", message=message, category=category)


_quiet()
