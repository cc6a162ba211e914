"""Contract tests for megatron_longact.compat: the CPU runtime layer and the megatron-core internals
it relies on. A megatron-core or torch upgrade that breaks the layer fails here first."""

import pytest
import torch

from megatron_longact import compat


@pytest.fixture
def cpu_layer():
    compat.enable_cpu_runtime()
    yield
    compat.disable_cpu_runtime()


def test_tested_version_is_installed():
    assert compat.megatron_version() in compat.TESTED_MEGATRON_VERSIONS


def test_refuses_to_activate_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        compat.enable_cpu_runtime()
    assert not compat.cpu_runtime_enabled()


def test_cuda_requests_land_on_cpu(cpu_layer):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(3, dtype=torch.bfloat16)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert not torch.cuda.is_available()  # code that branches on it still sees a CPU machine


def test_layer_is_undone(cpu_layer):
    compat.disable_cpu_runtime()
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    compat.enable_cpu_runtime()  # the fixture disables it again


def test_megatron_call_sites_run(cpu_layer):
    """The megatron call sites that fail on CPU without the runtime layer (docs/megatron_internals.md), exercised directly."""
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]


def test_rng_tracker_forks_a_separate_reproducible_stream(cpu_layer):
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 42)
    torch.manual_seed(0)
    with tracker.fork("test-stream"):
        inside = torch.rand(3)
    outside = torch.rand(3)
    tracker.reset()
    # Inside the fork: the named stream, seeded 42.
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(42)))
    # Outside: the default stream continues as if the fork never happened.
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), outside)


def test_internals_we_rely_on_exist():
    for module, attr, params in [
        ("megatron.core.tensor_parallel.random", "_lazy_call", ()),
        ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed", ("seed",)),
        ("megatron.core.parallel_state", "initialize_model_parallel",
         ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")),
        ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec",
         ("qk_layernorm", "normalization")),
        ("megatron.core.optimizer", "get_megatron_optimizer", ("config", "model_chunks")),
        ("megatron.core.pipeline_parallel", "get_forward_backward_func", ()),
    ]:
        compat.require_attr(module, attr, params)
    with pytest.raises(RuntimeError, match="is missing"):
        compat.require_attr("megatron.core.parallel_state", "no_such_function")
    with pytest.raises(RuntimeError, match="no longer takes"):
        compat.require_attr("megatron.core.parallel_state", "initialize_model_parallel", ("bogus",))


def test_backward_and_recomputation_run_under_the_layer(cpu_layer):
    """The autograd engine (where checkpointed forwards are recomputed) sees the layer too."""

    class NeedsCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2 * torch.ones(1, device="cuda")

    x = torch.ones(3, requires_grad=True)
    NeedsCudaInBackward.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    y = torch.ones(2, requires_grad=True)
    torch.autograd.backward([NeedsCudaInBackward.apply(y)], grad_tensors=[torch.ones(2)])
    assert y.grad.tolist() == [2.0, 2.0]
