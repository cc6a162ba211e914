"""Next-token (LM) training on synthetic text: the engine's smoke test and layout-invariance check.

The global batch of step t is generated from (seed, t) on every rank, identically; each data-parallel
rank then takes its contiguous slice and cuts it into micro-batches. So every (TP, PP, DP) layout
sees the same sequences in the same optimizer steps.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_longact.training.engine import Engine, reduce_last_stage_mean, setup_engine, train_step

# A small lexicon makes the synthetic text learnable within a few steps (spelling, spaces).
_WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain "
          "needle haystack key value token channel query head layer").split()


def synthetic_lm_batch(step: int, batch_size: int, seq_length: int, seed: int) -> torch.Tensor:
    """[batch_size, seq_length + 1] byte ids of random word sequences for step ``step``."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    rows = []
    for _ in range(batch_size):
        ids: list[int] = []
        while len(ids) < seq_length + 1:
            word = _WORDS[int(torch.randint(len(_WORDS), (1,), generator=gen))]
            ids.extend((word + " ").encode())
        rows.append(ids[: seq_length + 1])
    return torch.tensor(rows, dtype=torch.long)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    # clone: the schedule divides the returned loss by the micro-batch count in place.
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(longact, data_iterator, model):
    tokens, labels = next(data_iterator)
    if longact is not None:
        longact.begin_microbatch()  # every token counts (no padding in synthetic LM data)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))


def micro_batches_for_step(step: int, engine: Engine, device) -> list:
    from megatron.core import parallel_state as ps

    cfg = engine.train_cfg
    full = synthetic_lm_batch(step, cfg.global_batch_size, cfg.seq_length, cfg.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = full.chunk(dp)[dp_rank]
    return [(mb[:, :-1].to(device), mb[:, 1:].to(device)) for mb in local.split(cfg.micro_batch_size)]


def train_lm(model_cfg, train_cfg, parallel, device, on_step=None, longact_cfg=None) -> list[float]:
    """Train ``train_cfg.steps`` steps of LM loss; return the global mean loss of each step (the
    same list on every rank). With ``longact_cfg``, LongAct is installed on the optimizer;
    ``on_step(step, loss, out)`` finds the handle in ``out["longact"]`` (its ``metrics`` and
    ``longact`` controller) and the engine in ``out["engine"]``."""
    from megatron.core import parallel_state as ps

    from megatron_longact.longact.optimizer import install

    engine = setup_engine(model_cfg, train_cfg, parallel)
    handle = None
    if longact_cfg is not None and longact_cfg.enabled:
        handle = install(engine.model, engine.optimizer, longact_cfg)
    num_mb = train_cfg.num_microbatches(ps.get_data_parallel_world_size())
    history = []
    for step in range(train_cfg.steps):
        mbs = micro_batches_for_step(step, engine, device)
        out = train_step(engine, partial(_forward_step, handle), iter(mbs), num_mb,
                         train_cfg.seq_length, train_cfg.micro_batch_size)
        out["longact"] = handle
        out["engine"] = engine
        loss = reduce_last_stage_mean([float(d["lm_loss"]) for d in out["losses"]])
        history.append(loss)
        if on_step is not None:
            on_step(step, loss, out)
    return history
