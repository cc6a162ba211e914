"""The one door to megatron-core internals and the CPU runtime layer.

Everything megatron_longact touches that megatron-core does not promise as public API lives here:
the CPU/gloo runtime layer that lets megatron-core run without CUDA, and (later) the accessors for
optimizer internals. Each piece names the versions it was tested on and checks, on use, that the
things it relies on still exist, so a megatron-core upgrade fails loudly here instead of silently
elsewhere. ``tests/test_compat.py`` is the contract test.

Tested with megatron-core 0.16.1 and torch 2.13.0 (CPU build).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

TESTED_MEGATRON_VERSIONS = ("0.16.1",)


def megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def check_megatron_version(strict: bool = False) -> str:
    """Warn (or raise with ``strict``) when megatron-core is not a tested version."""
    version = megatron_version()
    if version not in TESTED_MEGATRON_VERSIONS:
        msg = (
            f"megatron-core {version} is not a version megatron_longact was tested with "
            f"({', '.join(TESTED_MEGATRON_VERSIONS)}); the contract tests in tests/test_compat.py "
            "tell whether the internals it relies on still hold"
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
    return version


def require_attr(module_name: str, attr_path: str, params: tuple[str, ...] = ()):
    """Return ``module.attr.path`` and check that a callable accepts ``params``.

    Raises RuntimeError naming the megatron-core symbol when it moved or its signature changed.
    """
    module = importlib.import_module(module_name)
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RuntimeError(
                f"megatron-core {megatron_version()}: {module_name}.{attr_path} is missing; "
                f"megatron_longact was tested with {TESTED_MEGATRON_VERSIONS}"
            )
        obj = getattr(obj, part)
    if params:
        names = set(inspect.signature(obj).parameters)
        missing = [p for p in params if p not in names]
        if missing:
            raise RuntimeError(
                f"megatron-core {megatron_version()}: {module_name}.{attr_path} no longer takes "
                f"{missing}; megatron_longact was tested with {TESTED_MEGATRON_VERSIONS}"
            )
    return obj


# --------------------------------------------------------------------------------------------
# CPU runtime layer
# --------------------------------------------------------------------------------------------
#
# megatron-core 0.16 hard-codes CUDA in about 175 places: `torch.cuda.current_device()` as a
# device argument, literal `device="cuda"`, `tensor.type() == 'torch.cuda.FloatTensor'` checks in
# the optimizers, and a CUDA RNG tracker. Rather than patching each megatron function, the layer
# works below megatron, at the torch level:
#   1. a TorchFunctionMode, pushed once for the process, rewrites every CUDA device argument of a
#      torch call to the CPU, makes `Tensor.cuda()` a no-op and answers `Tensor.type()` with the
#      CUDA type name megatron expects;
#   2. the `torch.cuda` functions megatron calls (current_device, synchronize, RNG state, streams,
#      memory statistics) get CPU stand-ins. `torch.cuda.is_available()` stays False, so code that
#      branches on it still sees a CPU machine.
# The "CUDA" RNG is the default CPU generator: megatron's tracker forks it (saves its state, loads
# a named stream, restores it afterwards), so dropout inside a forked region draws from the named
# stream exactly as it would on a GPU, and the stream outside the region is left untouched.

_CPU = torch.device("cpu")
_state = {"enabled": False, "mode": None, "saved": []}
_MISSING = object()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch.cuda.current_device() names a device.
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device):
    return _CPU if _is_cuda_device(device) else device


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, dict):
        return tuple(x.values())
    return tuple(x)


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                  grad_variables=None, inputs=None) -> None:
    """torch.autograd.backward without its __torch_function__ dispatch: the autograd engine
    directly, so the engine runs (and recomputes checkpointed forwards) with the mode active."""
    from torch.autograd import Variable

    tensors = _as_tuple(tensors)
    grads = _as_tuple(grad_tensors if grad_tensors is not None else grad_variables)
    if not grads:
        grads = (None,) * len(tensors)
    filled = []
    for t, g in zip(tensors, grads):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t)
        filled.append(g)
    keep = create_graph if retain_graph is None else retain_graph
    Variable._execution_engine.run_backward(
        tensors, tuple(filled), keep, create_graph, _as_tuple(inputs),
        allow_unreachable=True, accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests of torch calls to the CPU (see the module comment)."""

    # The calls handled below whatever their arguments. Any other call without keyword arguments
    # has no device to rewrite (torch takes devices as keywords, except Tensor.to and .cuda): it
    # runs as it is, since every torch call of the process, down to attribute reads, comes here.
    _SPECIAL = frozenset((torch.autograd.backward, torch.Tensor.backward, torch.Tensor.cuda,
                          torch.Tensor.type, torch.Tensor.to))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in self._SPECIAL:
            return func(*args)
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            # A mode is switched off while its handler runs; the backward pass (and the forward
            # recomputation of activation checkpointing inside it) must run with it switched on.
            if func is torch.Tensor.backward:
                names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
                kwargs = {("grad_tensors" if k == "gradient" else k): v for k, v in kwargs.items()}
                kwargs.update(zip(names, args))
                args = ()
            with self:
                return _run_backward(*args, **kwargs)
        if func is torch.Tensor.cuda:
            tensor = args[0]
            if kwargs.get("non_blocking") is not None:
                kwargs.pop("non_blocking")
            return tensor
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers sort params by 'torch.cuda.<T>Tensor' names.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            # Pinned host memory needs a CUDA allocator; megatron pins index tensors it then moves
            # to the GPU (e.g. the CP slice of the RoPE table, rope_utils.py:62).
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            # Tensor.to(device, ...): any int or CUDA name in position 1 is a device.
            args = (args[0], _map_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream / Event: everything on the CPU is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cuda_stand_ins() -> list[tuple[str, str, object]]:
    """(module, attribute, CPU stand-in) for every CUDA entry point megatron-core 0.16 calls."""
    stand_ins = {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "default_generators": (torch.default_generator,),
        "Stream": _NullStream,
        "Event": _NullStream,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: _NullStream(),
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "empty_cache": lambda *a, **k: None,
    }
    patches = [("torch.cuda", name, fn) for name, fn in stand_ins.items()]
    patches += [
        ("torch.cuda.random", "get_rng_state", stand_ins["get_rng_state"]),
        ("torch.cuda.random", "set_rng_state", stand_ins["set_rng_state"]),
        # megatron's RNG tracker imported these by name; torch defers _lazy_call callbacks until
        # CUDA initializes, which never happens on the CPU, so run them at once.
        ("megatron.core.tensor_parallel.random", "_lazy_call", lambda cb, **k: cb()),
        ("megatron.core.tensor_parallel.random", "_lazy_init", lambda: None),
        ("megatron.core.tensor_parallel.random", "device_ctx_manager", _NullStream),
    ]
    return patches


def cpu_runtime_enabled() -> bool:
    return _state["enabled"]


def enable_cpu_runtime() -> None:
    """Let megatron-core 0.16 run on the CPU with gloo. Call once per process, before building models.

    Refuses to run where CUDA is available: on a GPU machine megatron-core must run unmodified.
    Idempotent. Undo with :func:`disable_cpu_runtime` (tests only).
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "enable_cpu_runtime() is for CPU-only machines; CUDA is available here, so "
            "megatron-core must run unmodified (use backend 'nccl')"
        )
    if _state["enabled"]:
        return
    check_megatron_version()
    saved = []
    for module_name, attr, stand_in in _cuda_stand_ins():
        module = importlib.import_module(module_name)
        if module_name.startswith("megatron") and not hasattr(module, attr):
            raise RuntimeError(
                f"megatron-core {megatron_version()}: {module_name}.{attr} is gone; the CPU runtime "
                f"layer was written for {TESTED_MEGATRON_VERSIONS} and must be updated"
            )
        saved.append((module, attr, getattr(module, attr, _MISSING)))
        setattr(module, attr, stand_in)
    mode = _CudaToCpuMode()
    mode.__enter__()
    _state.update(enabled=True, mode=mode, saved=saved)
    log.info("megatron_longact CPU runtime layer enabled (torch %s)", torch.__version__)


def disable_cpu_runtime() -> None:
    """Undo :func:`enable_cpu_runtime` (used by tests that check the layer's scope)."""
    if not _state["enabled"]:
        return
    _state["mode"].__exit__(None, None, None)
    for module, attr, original in reversed(_state["saved"]):
        if original is _MISSING:
            delattr(module, attr)
        else:
            setattr(module, attr, original)
    _state.update(enabled=False, mode=None, saved=[])


# --------------------------------------------------------------------------------------------
# Optimizer internals
# --------------------------------------------------------------------------------------------
#
# LongAct freezes individual rows of W_Q/W_K inside megatron-core's optimizers. It needs, for each
# model parameter, the fp32 tensor the torch optimizer actually steps ("main" parameter) and which
# part of the model parameter that tensor covers. megatron-core 0.16 keeps these in:
#   DistributedOptimizer:       model_float16_groups[g][i] <-> shard_fp32_from_float16_groups[g][i]
#                               model_fp32_groups[g][i]    <-> shard_fp32_groups[g][i]
#                               and _get_model_param_range_map(p)["param"] = the owned flat slice
#   Float16OptimizerWithFloat16Params: float16_groups <-> fp32_from_float16_groups (whole copies),
#                               fp32_from_fp32_groups (the model params themselves)
#   FP32Optimizer:              optimizer.param_groups (the model params themselves)
# ChainedOptimizer holds the optimizers above in ``chained_optimizers``.


@dataclass
class MainParamRef:
    """One (model parameter, main parameter) pair of a megatron optimizer.

    ``main_param`` covers elements [flat_start, flat_start + main_param.numel()) of
    ``model_param.view(-1)`` (the whole parameter except under the distributed optimizer).
    """

    model_param: torch.nn.Parameter
    main_param: torch.Tensor
    flat_start: int
    torch_optimizer: torch.optim.Optimizer
    megatron_optimizer: object


def inner_optimizers(optimizer) -> list:
    """The non-chained megatron optimizers inside ``optimizer``."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def main_param_refs(optimizer) -> list[MainParamRef]:
    """Every (model param, main param) pair of a megatron-core optimizer; see the comment above.

    Raises NotImplementedError for optimizer options whose main-parameter layout LongAct does not
    handle, naming the option.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

    refs: list[MainParamRef] = []
    for opt in inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        config = opt.config
        if getattr(config, "use_precision_aware_optimizer", False):
            raise NotImplementedError(
                "optimizer.use_precision_aware_optimizer: LongAct's exact freeze restores fp32 main "
                "params and Adam moments; the precision-aware optimizer keeps them inside "
                "Transformer Engine's FusedAdam in other dtypes, which is not handled yet"
            )
        if getattr(config, "optimizer_cpu_offload", False):
            raise NotImplementedError("optimizer.optimizer_cpu_offload is not supported by LongAct")
        if isinstance(opt, DistributedOptimizer):
            require_attr("megatron.core.optimizer.distrib_optimizer",
                         "DistributedOptimizer._get_model_param_range_map")
            pairs = list(zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups))
            pairs += list(zip(opt.model_fp32_groups, opt.shard_fp32_groups))
            for model_group, main_group in pairs:
                if len(model_group) != len(main_group):
                    raise RuntimeError("DistributedOptimizer groups are not aligned (megatron-core changed)")
                for model_param, main_param in zip(model_group, main_group):
                    _reject_fp8(model_param)
                    start = opt._get_model_param_range_map(model_param)["param"].start
                    refs.append(MainParamRef(model_param, main_param, start, opt.optimizer, opt))
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model_param, main_param in zip(model_group, main_group):
                    _reject_fp8(model_param)
                    refs.append(MainParamRef(model_param, main_param, 0, opt.optimizer, opt))
            for group in opt.fp32_from_fp32_groups:
                refs += [MainParamRef(p, p, 0, opt.optimizer, opt) for p in group]
        elif isinstance(opt, FP32Optimizer):
            for group in opt.optimizer.param_groups:
                refs += [MainParamRef(p, p, 0, opt.optimizer, opt) for p in group["params"]]
        else:
            raise NotImplementedError(
                f"LongAct does not know the main-parameter layout of {type(opt).__name__}; "
                "supported: DistributedOptimizer, Float16OptimizerWithFloat16Params, FP32Optimizer"
            )
    return refs


def _reject_fp8(param) -> None:
    try:
        from megatron.core.fp8_utils import is_float8tensor
    except ImportError:  # pragma: no cover - older layouts
        return
    if is_float8tensor(param):
        raise NotImplementedError(
            "FP8 primary weights (fp8_param_gather): the model copy of a frozen row would be "
            "re-quantized with a new scale each step, so it cannot stay bit-identical; use BF16 "
            "primary weights with FP8 compute instead"
        )


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a fresh DistributedOptimizer the state tensors a checkpoint load fills in place.

    megatron-core 0.16's DistributedOptimizer.sharded_state_dict(is_loading=True) reads the inner
    torch optimizer's ``step`` and fails on an optimizer that has not stepped yet (torch AdamW
    creates its state lazily). megatron's own remedy, used for its fsdp_dtensor format, is one
    optimizer step on zero gradients; every value it touches is then overwritten by the load.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in inner_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            require_attr("megatron.core.optimizer.distrib_optimizer",
                         "DistributedOptimizer._init_optimizer_states_with_dummy_values")
            opt._init_optimizer_states_with_dummy_values()


def restore_torch_adam_step(optimizer, loaded_state: dict) -> None:
    """Re-apply the saved Adam step count after a ``dp_reshardable`` load with torch's Adam(W).

    megatron-core 0.16 keeps torch Adam's per-parameter ``step`` tensor inside the dp_reshardable
    parameter state as a plain value, so a load hands back the *template's* step (that of the
    fresh optimizer) and overwrites the correct count that load_state_dict had just set from the
    saved param groups. Apex/TE FusedAdam keep the step in the param groups and are unaffected.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = inner_optimizers(optimizer)
    for i, opt in enumerate(inners):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(
                opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        sd = loaded_state if len(inners) == 1 else loaded_state[i]
        steps = {g.get("step") for g in sd["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(steps) != 1:
            continue
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)
