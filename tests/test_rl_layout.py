"""Layout invariance: splitting the batch over DP ranks and micro-batches changes neither the loss nor
its gradient, for every loss and aggregation mode, when the global counts are passed.

The split is uneven (3 and 5 responses on the two ranks), each micro-batch is trimmed to its own
longest response (so response_len differs between micro-batches), and one response is empty (as after
overlong filtering), which must count neither as tokens nor as a response.
"""

import torch

from megatron_longact.rl.batch_stats import BatchCounts, global_batch_counts, local_batch_counts
from megatron_longact.rl.kl import kl_loss
from megatron_longact.rl.losses import LOSS_AGG_MODES, policy_loss
from tests.dist_harness import run_distributed

NAMES = ("ppo", "grpo", "dapo", "dr_grpo", "gspo")
# seq-mean-token-sum-norm needs one constant for every micro-batch; the other modes ignore it.
SCALE = 10.0
# Rows of the global batch on each DP rank, and the micro-batches of each rank (shard-local rows).
RANK_ROWS = ((0, 3), (3, 8))
MICRO_BATCHES = {0: ((0, 2), (2, 3)), 1: ((0, 1), (1, 4), (4, 5))}


def make_batch(seed=0, batch=8, length=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 1, 5, 0, 2, 6, 4])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    # Small log-ratios so that GSPO's narrow clip leaves some responses unclipped.
    log_ratio = (torch.rand(batch, length, generator=g, dtype=torch.float64) - 0.5) * 0.6
    log_ratio[:4] *= 1e-3
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    ref = old - 0.1 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    return old + log_ratio, old, adv, mask, ref


def _cases():
    for name in NAMES:
        for mode in LOSS_AGG_MODES:
            yield name, mode


def whole_batch(log_probs, old, adv, mask, ref):
    """Reference: every case on the whole batch, without global counts."""
    out = {}
    for name, mode in _cases():
        lp = log_probs.clone().requires_grad_()
        loss, _ = policy_loss(name, lp, old, adv, mask, loss_agg_mode=mode, loss_scale_factor=SCALE)
        loss.backward()
        out[name, mode] = (loss.detach(), lp.grad)
    lp = log_probs.clone().requires_grad_()
    loss, _ = kl_loss(lp, ref, mask, "k3", "seq-mean-token-mean")
    loss.backward()
    out["kl"] = (loss.detach(), lp.grad)
    return out


def shard(log_probs, old, adv, mask, ref, micro_batches, counts: BatchCounts):
    """Sum of the micro-batch losses of one rank and the gradient of its rows."""
    out = {}
    for key in list(_cases()) + ["kl"]:
        lp_leaf = log_probs.clone().requires_grad_()
        total = torch.zeros((), dtype=torch.float64)
        for start, end in micro_batches:
            rows = slice(start, end)
            width = max(int(mask[rows].sum(-1).max()), 1)  # trim this micro-batch's padding
            cols = slice(0, width)
            args = (lp_leaf[rows, cols], old[rows, cols])
            if key == "kl":
                loss, _ = kl_loss(args[0], ref[rows, cols], mask[rows, cols], "k3", "seq-mean-token-mean",
                                  **counts.loss_kwargs())
            else:
                name, mode = key
                loss, _ = policy_loss(name, *args, adv[rows], mask[rows, cols], loss_agg_mode=mode,
                                      loss_scale_factor=SCALE, **counts.loss_kwargs())
            total = total + loss
        total.backward()
        out[key] = (total.detach(), lp_leaf.grad)
    return out


def _dp_worker(runtime, batch):
    from megatron.core import parallel_state

    rank = torch.distributed.get_rank(parallel_state.get_data_parallel_group())
    start, end = RANK_ROWS[rank]
    local = [t[start:end] for t in batch]
    mask = local[3]
    counts = global_batch_counts([mask[a:b] for a, b in MICRO_BATCHES[rank]],
                                 group=parallel_state.get_data_parallel_group())
    # Plain lists, not tensors: a tensor put on the result queue is shared through a file descriptor
    # that dies with this process, which may exit before the test reads it.
    out = shard(*local, MICRO_BATCHES[rank], counts)
    return counts, {key: (loss.item(), grad.tolist()) for key, (loss, grad) in out.items()}


def _check(reference, shards):
    """shards: per-rank dicts of (loss share, gradient of that rank's rows)."""
    for key, (loss, grad) in reference.items():
        total = sum(s[key][0] for s in shards)
        torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-12, msg=f"loss of {key}")
        torch.testing.assert_close(torch.cat([s[key][1] for s in shards]), grad, rtol=1e-12, atol=1e-12,
                                   msg=f"gradient of {key}")
        assert grad.abs().sum() > 0, key


def test_micro_batches_in_one_process():
    batch = make_batch()
    micro_batches = ((0, 3), (3, 4), (4, 6), (6, 8))
    counts = local_batch_counts([batch[3][a:b] for a, b in micro_batches])
    # Lengths 3, 7, 1, 5, 0, 2, 6, 4: 28 tokens, 7 non-empty responses.
    assert counts == BatchCounts(num_tokens=28, num_seqs=7)
    assert global_batch_counts(batch[3], group=None) == counts
    _check(whole_batch(*batch), [shard(*batch, micro_batches, counts)])


def test_data_parallel_ranks_gloo():
    batch = make_batch()
    results = run_distributed(_dp_worker, dp=2, args=(batch,), timeout=180)
    for counts, _ in results:
        assert counts == BatchCounts(num_tokens=28, num_seqs=7)
    shards = [{key: (torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64))
               for key, (loss, grad) in shard_result.items()} for _, shard_result in results]
    _check(whole_batch(*batch), shards)


def _cp_worker(runtime, batch):
    """Each CP rank holds the load-balanced column chunks of every row (one micro-batch)."""
    from megatron.core import parallel_state

    from megatron_longact.training.batching import cp_positions

    group = parallel_state.get_context_parallel_group()
    cols = cp_positions(8, 2, parallel_state.get_context_parallel_rank())
    log_probs, old, adv, mask, ref = batch
    counts = local_batch_counts(mask)  # of whole responses, before the split
    out = {}
    for key in list(_cases()) + ["kl"]:
        lp_leaf = log_probs.clone().requires_grad_()
        if key == "kl":
            loss, _ = kl_loss(lp_leaf[:, cols], ref[:, cols], mask[:, cols], "k3", "seq-mean-token-mean",
                              cp_group=group, **counts.loss_kwargs())
        else:
            name, mode = key
            loss, _ = policy_loss(name, lp_leaf[:, cols], old[:, cols], adv, mask[:, cols], loss_agg_mode=mode,
                                  loss_scale_factor=SCALE, cp_group=group, **counts.loss_kwargs())
        loss.backward()
        out[key] = (loss.item(), lp_leaf.grad.tolist())
    return out


def test_context_parallel_split_of_each_response_gloo():
    """Every response's tokens split over 2 CP ranks (chunks 0+3 and 1+2 of 4): the shares add up
    to the whole-batch loss and the gradients to its gradient, for every loss and mode (GSPO's
    sequence ratio and seq-mean-token-mean's lengths are over whole responses)."""
    log_probs, old, adv, mask, ref = make_batch()
    pad = lambda t: torch.cat([t, torch.zeros(t.shape[0], 1, dtype=t.dtype)], dim=1)  # 7 -> 8 columns
    batch = (pad(log_probs), pad(old), adv, pad(mask), pad(ref))
    results = run_distributed(_cp_worker, cp=2, args=(batch,), timeout=180)
    shards = [{key: (torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64))
               for key, (loss, grad) in r.items()} for r in results]
    reference = whole_batch(*batch)
    for key, (loss, grad) in reference.items():
        torch.testing.assert_close(shards[0][key][0] + shards[1][key][0], loss, rtol=1e-12, atol=1e-12,
                                   msg=f"loss of {key}")
        # Each rank's gradient is non-zero only on its own columns.
        torch.testing.assert_close(shards[0][key][1] + shards[1][key][1], grad, rtol=1e-12, atol=1e-12,
                                   msg=f"gradient of {key}")
