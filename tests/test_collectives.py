"""Collectives only through megatron_longact.runtime.collectives, on the backend's device.

NCCL rejects CPU tensors and gloo accepts them, so a CPU-built tensor in a collective passes every
gloo test and crashes on GPUs. Two guards: an AST check over the package source (no raw
torch.distributed collective outside the collectives module), and the trainer run at 1 and 2
ranks with every torch.distributed collective wrapped, checking each tensor against the device
the group's backend needs and that package code reaches torch.distributed only through the
collectives module.
"""

import ast
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megatron_longact"
ALLOWED = {PACKAGE / "runtime" / "collectives.py"}
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor",
    "_all_gather_base", "all_gather_object", "broadcast_object_list", "gather", "gather_object",
    "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
}
# What each backend needs, independent of the code under test: NCCL takes CUDA tensors only.
BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}


def _raw_collectives(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()  # names bound to torch.distributed in this file
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch.distributed", "torch.distributed.distributed_c10d"):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            for a in node.names:
                if a.name in COLLECTIVES:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name == "distributed":
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in aliases | {"torch.distributed"}:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_no_raw_collective_outside_the_collectives_module():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path not in ALLOWED
                 for hit in _raw_collectives(path)]
    assert not offenders, "collectives must go through megatron_longact.runtime.collectives:\n" + \
        "\n".join(offenders)


def test_the_ast_check_sees_the_usual_spellings(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch\nimport torch.distributed as dist\nimport torch.distributed\n"
                   "from torch.distributed import all_reduce\nfrom torch import distributed as d2\n"
                   "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nd2.barrier()\n"
                   "dist.get_world_size()\n")
    hits = _raw_collectives(src, tmp_path)
    assert len(hits) == 4, hits


def test_comm_device_follows_the_backend(monkeypatch):
    from megatron_longact.runtime import collectives

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, expected in [("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                              ("cpu:gloo,cuda:nccl", torch.device("cpu"))]:
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        assert collectives.comm_device(object()) == expected, backend


def test_collectives_without_process_group_are_identities():
    from megatron_longact.runtime import collectives

    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t, None) is t
    assert collectives.all_reduce_values([3, 4.5]) == [3.0, 4.5]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    assert collectives.size() == 1 and collectives.rank() == 0


def _wrap_collectives(calls: list) -> None:
    import sys

    import torch.distributed as dist

    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, (list, tuple)):
            for y in x:
                yield from tensors(y)

    def make(name, fn):
        def wrapper(*args, **kwargs):
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            group = kwargs.get("group")
            backend = str(dist.get_backend(group))
            need = BACKEND_DEVICE.get(backend, backend)
            bad = [str(t.device) for a in (*args, *kwargs.values()) for t in tensors(a)
                   if t.device.type != need]
            inside = PACKAGE in caller.parents
            calls.append((name, str(caller.relative_to(ROOT)) if inside else "external", bad))
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            setattr(dist, name, make(name, fn))


def _train_wrapped(runtime, tmp):
    from tests.test_trainer import _config

    calls = []
    _wrap_collectives(calls)
    from megatron_longact.training.trainer import Trainer

    cfg = _config(tmp, f"{tmp}/out", **{"sft.steps": 1, "train.steps": 1, "rl.kl_coef": 0.05})
    Trainer(cfg, runtime).run()
    return calls


@pytest.mark.parametrize("dp", [1, 2])
def test_trainer_collectives_use_the_backend_device(tmp_path, dp):
    results = run_distributed(_train_wrapped, dp=dp, args=(str(tmp_path),))
    for calls in results:
        package = [c for c in calls if c[1] != "external"]
        callers = {c[1] for c in package}
        assert callers <= {"megatron_longact/runtime/collectives.py"}, callers
        wrong = [c for c in calls if c[2]]
        assert not wrong, wrong
        if dp > 1:
            # The wrapper does see the package's collectives (stop flag, counts, metrics).
            assert {c[0] for c in package} >= {"all_reduce", "barrier"}, package
