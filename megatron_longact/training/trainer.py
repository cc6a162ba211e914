"""The SFT and RL trainer behind ``longact-train`` (modes ``sft`` and ``rl``).

One optimizer step of RL (GRPO/DAPO family), every phase through megatron-core:
1. rollouts: this data-parallel rank's prompts, ``rl.group_size`` responses each, from the
   rollout engine (``rollout.engine``, :mod:`megatron_longact.rollout`: the policy itself with
   megatron's KV cache, or vLLM synced with it after every ``rollout.sync_interval`` steps),
   LongAct statistics paused;
2. rewards from the task records (``rl.reward``), DAPO shaping (dynamic sampling, overlong
   filtering and soft punishment) when configured, group advantages;
3. old log-probs recomputed teacher-forced (so the first ratio is exactly 1) when the update is
   not on-policy (several epochs or mini-batches) or the IS correction needs them; on-policy, the
   update pass's own detached log-probs are pi_old, and with a vLLM engine the training-inference
   mismatch metric is measured on that pass;
4. ``rl.ppo_epochs`` x ``rl.mini_batches`` optimizer steps of the policy loss through megatron's
   forward-backward schedule, DDP and DistributedOptimizer, with LongAct statistics collected on
   these update passes and its masks applied inside the optimizer.

Loss normalization: each micro-batch's loss is its local sum divided by the *global* token (or
response) count of the mini-batch, times the number of micro-batches and the data-parallel size,
which undoes megatron's division by both; the gradient is then that of the whole mini-batch for
every layout.

Context parallelism (CP > 1): every CP rank of a data-parallel replica builds the same full batch,
padded to the layout's length (:mod:`megatron_longact.training.batching`: 2 x CP chunks, sequence
parallelism, FP8), then keeps its load-balanced part of tokens, labels (shifted before the split),
loss/response masks, LongAct token masks, old/reference log-probs and position ids. Global counts
are of whole responses, taken on the full masks. The loss of a CP rank is its partial sum over the
global count; megatron's schedule multiplies a two-value loss function's loss by CP
(``schedules.forward_step_calc_loss``) and DDP averages gradients over DP x CP, so the gradient is
again that of the whole mini-batch. Logged losses and metrics are reduced over the CP group inside
the loss function, so every CP rank logs the whole rows' values. Teacher-forced log-prob forwards
run on the CP parts and are gathered back over CP. Generation never runs under CP
(:func:`megatron_longact.preflight.check_rollout_layout`).

Data order: record ``k`` of the stream is record ``perm_e[k mod N]`` of a permutation drawn from
(``data.shuffle_seed``, epoch e); step ``t`` uses stream positions ``t*P .. t*P+P-1``. The
position is a function of the step, so resuming at step t sees the same prompts.
"""

from __future__ import annotations

import math
import random
import signal
import time
from functools import partial
from pathlib import Path

import torch

from megatron_longact.config import ConfigError
from megatron_longact.run_config import RunConfig
from megatron_longact.runtime import collectives


class RecordStream:
    """Deterministic, resumable order over task records (see the module docstring)."""

    def __init__(self, records: list[dict], seed: int):
        if not records:
            raise ConfigError("data: no records to train on")
        self.records = records
        self.seed = seed
        self._perm_epoch = None
        self._perm = None

    def __getitem__(self, k: int) -> dict:
        epoch, i = divmod(k, len(self.records))
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(len(self.records), generator=gen).tolist()
            self._perm_epoch = epoch
        return self.records[self._perm[i]]


def load_records(cfg: RunConfig, tokenizer) -> list[dict]:
    """The training records: generated (ruler) or read from a local JSONL/parquet file."""
    from megatron_longact.data.jsonl import check_task_record, read_task_records

    data = cfg.data
    if data.source == "ruler":
        from megatron_longact.tasks.ruler import generate_ruler

        return generate_ruler(data.ruler, tokenizer, data.prompt)
    if data.source == "jsonl":
        return read_task_records(data.path)
    import datasets

    path = Path(data.path)
    if not path.is_file():
        raise ConfigError(f"data.path: {path} does not exist")
    records = [dict(r) for r in datasets.load_dataset("parquet", data_files=str(path), split="train")]
    for i, record in enumerate(records):
        check_task_record(record, f"{path}: row {i}")
    return records


def _pad_batch(seqs: list[list[int]], pad_id: int, max_len: int, layout) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_longact.training.batching import pad_batch

    return pad_batch(seqs, pad_id, max_len, layout)


class Trainer:
    """Runs ``cfg`` on this rank; construct after :func:`megatron_longact.runtime.initialize`."""

    def __init__(self, cfg: RunConfig, runtime, *, tokenizer=None, records: list | None = None):
        from megatron.core import parallel_state as ps

        from megatron_longact.data.tokenizer import load_tokenizer
        from megatron_longact.tasks.rewards import Reward
        from megatron_longact.training.engine import setup_engine

        self.cfg, self.runtime = cfg, runtime
        self.rank0 = runtime.rank == 0
        # ``tokenizer`` / ``records``: already loaded and checked by megatron_longact.preflight.
        self.tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({self.tokenizer.vocab_size})")
        self.reward = Reward(cfg.rl.reward)
        from megatron_longact.data.prompt_limit import apply_prompt_limit

        records, self.prompt_report = apply_prompt_limit(records or load_records(cfg, self.tokenizer),
                                                         self._full_prompt, cfg.data)
        self.prompts_truncated = 0
        if self.prompt_report is not None and self.rank0:
            r = self.prompt_report
            print(f"data: {r.over} of {r.total} prompts are longer than data.max_prompt_length="
                  f"{cfg.data.max_prompt_length} (longest {r.longest}); "
                  f"{cfg.data.prompt_overflow}: {r.total - r.filtered} records left", flush=True)
        self.stream = RecordStream(records, cfg.data.shuffle_seed)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.cp, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        from megatron_longact.training.batching import SequenceLayout

        self.layout = SequenceLayout.of(runtime.parallel, cfg.model)
        self.sft_steps = cfg.sft.steps if cfg.train.mode == "rl" else cfg.train.steps
        self.rl_steps = cfg.train.steps if cfg.train.mode == "rl" else 0
        self.total_steps = self.sft_steps + self.rl_steps
        train = cfg.train
        self.out_dir = Path(cfg.output.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"
        # Before the model exists: repair an interrupted re-save, find and check the checkpoint.
        from megatron_longact.training.resilience import SkipGuard, prepare_resume

        self.resume_from = prepare_resume(cfg, self.ckpt_dir, runtime.parallel, self.rank0)
        self.skips = SkipGuard(train.max_nonfinite_skips)
        self.pending_save = None
        self.engine = setup_engine(cfg.model, train, runtime.parallel,
                                   initialize_weights=not cfg.checkpoint.load_weights)
        if cfg.checkpoint.load_weights:
            from megatron_longact.convert.checkpoint import load_model_weights

            load_model_weights(self.engine.gpt_models[0], cfg.checkpoint.load_weights, cfg.model)
            # The optimizer's fp32 main weights were copied from the model at construction.
            self.engine.optimizer.reload_model_params()
        self.handle = None
        # Logits of the RL loss only over the micro-batch's response columns (last stage only).
        self.out_window = None
        if getattr(self.engine.gpt_models[0], "post_process", False):
            from megatron_longact.models.output_window import OutputWindow

            self.out_window = OutputWindow(self.engine.gpt_models[0])
        self.ref_model = None
        self.rollout = None  # the rollout engine (megatron_longact.rollout), built at first use
        self.step = 0
        self.writer = None
        self.wandb = None
        self._stop = False
        self.history: list[dict] = []

    def _full_prompt(self, record: dict) -> list[int]:
        from megatron_longact.data.tokenizer import build_model_input

        return build_model_input(record, self.tokenizer, self.cfg.data.prompt).ids

    def _prompt(self, record: dict) -> list[int]:
        """The prompt tokens of ``record`` under data.max_prompt_length (truncate counts)."""
        from megatron_longact.data.prompt_limit import limit_prompt

        ids, cut = limit_prompt(self._full_prompt(record), self.cfg.data)
        self.prompts_truncated += int(cut)
        return ids

    # -- set-up ------------------------------------------------------------------------------
    def _rollout_engine(self):
        """The engine every generation goes through (rollout.engine), built at first use: after
        resume, so that an external engine starts from the weights training continues with."""
        if self.rollout is None:
            from megatron_longact.rollout import build_engine

            self.rollout = build_engine(self.cfg.rollout, model=self.engine.model[0],
                                        model_cfg=self.cfg.model, tokenizer=self.tokenizer,
                                        max_model_len=self.cfg.model.max_position_embeddings,
                                        work_dir=self.out_dir / "rollout", seed=self.cfg.train.seed)
        self.rollout.ensure_synced()
        return self.rollout

    def _start_rl(self, *, copy_policy: bool = True) -> None:
        """Everything the RL phase adds: the LongAct handle and, with rl.kl_coef, the frozen
        reference policy (a copy of the policy as RL starts; from the checkpoint on resume)."""
        self._install_longact()
        if self.cfg.rl.kl_coef > 0 and self.ref_model is None:
            from megatron.core.transformer.module import Float16Module

            from megatron_longact.models.builder import build_model

            ref, tconfig = build_model(self.cfg.model, self.runtime.parallel)
            if copy_policy:
                ref.load_state_dict(self.engine.gpt_models[0].state_dict())
            for p in ref.parameters():
                p.requires_grad_(False)
            ref.eval()
            self.ref_model = Float16Module(tconfig, ref) if (tconfig.bf16 or tconfig.fp16) else ref

    def _install_longact(self) -> None:
        if self.handle is None and self.cfg.longact.enabled:
            from megatron_longact.longact.optimizer import install

            self.handle = install(self.engine.model, self.engine.optimizer, self.cfg.longact)

    def _on_signal(self, signum, frame) -> None:
        # SLURM sends SIGUSR1 (--signal) or SIGTERM before preemption: finish the step, save, exit.
        self._stop = True

    def _stop_requested(self) -> bool:
        from megatron_longact.runtime.stop import stop_file_present

        # The SLURM scripts ask for a stop through a file as well as by signal: torchrun does not
        # pass SIGUSR1 on to its workers (see runtime.stop).
        stop = self._stop or stop_file_present()
        return collectives.all_reduce_values([1.0 if stop else 0.0], None, op="max")[0] > 0

    # -- checkpoints -------------------------------------------------------------------------
    def _objects(self) -> dict:
        return {"scheduler": self.engine.scheduler.state_dict(), "step": self.step,
                "longact": self.handle.state_dict() if self.handle else None,
                "python_random": random.getstate()}

    def save(self) -> Path:
        from megatron_longact import checkpoint

        self.finish_save()
        ck = self.cfg.checkpoint
        folder = checkpoint.save(self.ckpt_dir, self.step, self.engine.model, self.engine.optimizer,
                                 self._objects(), keep=ck.keep, checksum=ck.checksum,
                                 extra_models=self._extra_models(), model_cfg=self.cfg.model,
                                 async_save=ck.async_save)
        if self.rank0:
            from megatron_longact.trained import write_run_config

            # Beside the checkpoints, so that eval and export need nothing but the checkpoint.
            write_run_config(self.ckpt_dir, self.cfg)
        if ck.async_save:
            self.pending_save, folder = folder, folder.final
            if self.rank0:
                _info(f"checkpoint: writing step {self.step} to {folder} in the background")
        elif self.rank0:
            _info(f"checkpoint: saved step {self.step} to {folder}")
        return folder

    def finish_save(self, blocking: bool = True) -> None:
        """Publish an asynchronous save once its write completed on every rank."""
        if self.pending_save is not None and self.pending_save.finalize(blocking=blocking):
            if self.rank0:
                _info(f"checkpoint: published {self.pending_save.final}")
            self.pending_save = None

    def _extra_models(self) -> dict:
        return {"reference": self.ref_model} if self.ref_model is not None else {}

    def maybe_resume(self) -> None:
        from megatron_longact import checkpoint

        folder = self.resume_from
        if folder is None:
            return
        # The LongAct handle must exist before loading if the checkpoint is past the SFT phase.
        manifest = checkpoint.verify(folder)
        # A checkpoint from inside the RL phase holds the LongAct state and the reference policy;
        # one from the SFT/RL boundary does not (RL, and the reference copy, start after loading).
        if manifest["step"] > self.sft_steps:
            self._start_rl(copy_policy=False)
        objs = checkpoint.load(folder, self.engine.model, self.engine.optimizer,
                               ["scheduler", "step", "longact", "python_random"],
                               extra_models=self._extra_models())
        self.engine.scheduler.load_state_dict(objs["scheduler"])
        self.step = int(objs["step"])
        if self.handle is not None and objs["longact"] is not None:
            self.handle.load_state_dict(objs["longact"])
        if self.rollout is not None:
            self.rollout.sync_weights()  # an engine built before the load holds other weights
        if self.rank0:
            _info(f"checkpoint: resumed from {folder} at step {self.step}")

    # -- SFT ---------------------------------------------------------------------------------
    def sft_step(self) -> dict:
        from megatron_longact.data.tokenizer import encode_completion
        from megatron_longact.training.engine import reduce_last_stage_mean, train_step

        cfg = self.cfg
        per_rank = cfg.sft.batch_size // self.dp
        base = self.step * cfg.sft.batch_size + self.dp_rank * per_rank
        seqs, loss_masks = [], []
        for i in range(per_rank):
            rec = self.stream[base + i]
            prompt = self._prompt(rec)
            answer = encode_completion(rec["answer"], self.tokenizer)
            seqs.append(prompt + answer)
            loss_masks.append([0] * (len(prompt) - 1) + [1] * len(answer))
        from megatron_longact.training.batching import shift_left

        tokens, valid = _pad_batch(seqs, self.tokenizer.pad_id, cfg.model.max_position_embeddings,
                                   self.layout)
        # Prediction space at the full length S: column t predicts token t + 1.
        mask = torch.zeros(tokens.shape)
        for i, m in enumerate(loss_masks):
            mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
        labels = shift_left(tokens, self.tokenizer.pad_id)
        # Counted on the full rows (every CP rank holds them), each token once: answer tokens (the
        # loss's normaliser) and every non-padding token the step processes.
        total, processed = collectives.all_reduce_values([float(mask.sum()), float(valid.sum())],
                                                         _dp_group())
        mb = cfg.train.micro_batch_size
        n_mb = math.ceil(per_rank / mb)
        scale = n_mb * self.dp / float(total)
        batches = [self._cp_part({"tokens": tokens[j:j + mb], "labels": labels[j:j + mb],
                                  "mask": mask[j:j + mb], "valid": valid[j:j + mb]})
                   for j in range(0, per_rank, mb)]
        if cfg.sft.lr is not None:
            # Set after the scheduler's last update, read by this step's optimizer update.
            for group in self.engine.optimizer.param_groups:
                group["lr"] = cfg.sft.lr * group.get("lr_mult", 1.0)
        out = train_step(self.engine, partial(_sft_forward_step, scale, _cp_group(self.cp)),
                         iter(batches), len(batches), tokens.shape[1], mb)  # megatron divides by CP
        self._after_update(out)
        loss = reduce_last_stage_mean([float(d["sft_loss"]) for d in out["losses"]])
        return {"sft/loss": loss, "train/grad_norm": out["grad_norm"], "train/lr": out["lr"],
                "perf/tokens": float(processed), "train/skipped_updates": float(out["skipped"])}

    def _cp_part(self, tensors: dict) -> dict:
        """This CP rank's part of each full-sequence ``[b, S]`` tensor (dim 1 split), plus the
        global ``position_ids`` of its tokens; ``[b]`` tensors (advantages) pass unchanged. On the
        training device."""
        from megatron_longact.training.batching import cp_positions, split_for_cp

        out = {}
        S = None
        for k, v in tensors.items():
            if v is None:
                continue
            if v.dim() >= 2:
                S = v.shape[1]
                v = split_for_cp(v, self.cp, self.cp_rank)
            out[k] = v.to(self.runtime.device)
        rows = out["tokens"].shape[0]
        out["position_ids"] = cp_positions(S, self.cp, self.cp_rank).unsqueeze(0).expand(rows, -1) \
            .to(self.runtime.device)
        return out

    def _after_update(self, out: dict) -> None:
        from megatron_longact.training.resilience import discard_step_statistics

        if out["skipped"]:
            discard_step_statistics(self.handle)
            if self.rank0:
                _info(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                      f"({self.skips.consecutive + 1} in a row)")
        self.skips.record(out["skipped"], self.step + 1)

    # -- RL ----------------------------------------------------------------------------------
    def _rollout(self, records: list[dict], sample_base: int) -> dict:
        """Generate ``group_size`` responses for each record; rewards and masks, on this rank."""
        from megatron_longact.generation import SamplingConfig
        from megatron_longact.rl.dapo import soft_overlong_punishment

        rl = self.cfg.rl
        G = rl.group_size
        prompts = [self._prompt(r) for r in records]
        prompts = [p for p in prompts for _ in range(G)]
        sampling = SamplingConfig(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                                  max_new_tokens=rl.max_new_tokens, seed=self.cfg.train.seed,
                                  ignore_eos=rl.ignore_eos)
        if self.handle is not None:
            self.handle.set_collecting(False)
        try:
            gen = self._rollout_engine().generate(
                prompts, sampling, sample_ids=[sample_base + i for i in range(len(prompts))])
        finally:
            if self.handle is not None:
                self.handle.set_collecting(True)
        texts = [self.tokenizer.decode(gen.response_ids(i)) for i in range(len(prompts))]
        scores = [self.reward.score(t, records[i // G]) for i, t in enumerate(texts)]
        rewards = torch.tensor([self.reward.shape(x) for x in scores])
        scores = torch.tensor(scores)
        if rl.overlong_buffer:
            rewards = rewards + soft_overlong_punishment(gen.response_lengths, rl.max_new_tokens,
                                                         rl.overlong_buffer)
        return {"prompts": prompts, "gen": gen, "scores": scores, "rewards": rewards}

    def _collect(self) -> dict:
        """This rank's rollout batch for the step (with DAPO dynamic sampling when configured)."""
        rl = self.cfg.rl
        per_rank = rl.prompts_per_step // self.dp
        rl_step = self.step - self.sft_steps
        base = rl_step * rl.prompts_per_step + self.dp_rank * per_rank
        offset = 10_000_019 * (self.sft_steps + 1)  # RL prompts come after the SFT ones
        records = [self.stream[offset + base + i] for i in range(per_rank)]
        # Sample ids seed each response's sampler: unique per (step, prompt, response, try), the
        # same under every layout. Room for 64 tries (rl.max_sampling_tries <= 64).
        sample_base = (self.step * rl.prompts_per_step + self.dp_rank * per_rank) * rl.group_size * 64
        if not rl.dynamic_sampling:
            batch = self._rollout(records, sample_base)
            batch["records"] = records
            batch["tries"] = 1
            return batch
        from megatron_longact.rl.dapo import DynamicSampler

        tries = {"n": 0}

        def sample_fn():
            k = tries["n"]
            tries["n"] += 1
            recs = records if k == 0 else [
                self.stream[offset + 5_000_011 * (k + 1) + base + i] for i in range(per_rank)]
            b = self._rollout(recs, sample_base + k * per_rank * rl.group_size)
            G = rl.group_size
            groups = [{"record": recs[g], "rows": list(range(g * G, (g + 1) * G)), "batch": b}
                      for g in range(len(recs))]
            if k == 0:
                first_try.extend(groups)
            return groups, b["scores"].reshape(-1, G)

        first_try: list[dict] = []
        result = DynamicSampler(sample_fn, per_rank, rl.max_sampling_tries, allow_partial=True).sample()
        kept = list(result.groups)
        if len(kept) < per_rank:
            # Every data-parallel rank must bring the same number of responses to the update. Top up
            # with first-try groups that were dropped for equal rewards: their advantages are zero,
            # so they add no gradient.
            kept += [g for g in first_try if all(g is not k for k in kept)][:per_rank - len(kept)]
        return self._merge_groups(kept, result.num_tries)

    def _merge_groups(self, groups: list[dict], tries: int) -> dict:
        """Reassemble rollout rows of kept groups (possibly from several tries) into one batch."""
        from megatron_longact.generation import GenerationOutput

        prompts, records, rows = [], [], []
        for g in groups:
            b = g["batch"]
            records.append(g["record"])
            for r in g["rows"]:
                prompts.append(b["prompts"][r])
                rows.append((b, r))
        width = max(b["gen"].tokens.shape[1] for b, _ in rows)
        n_resp = max(b["gen"].responses.shape[1] for b, _ in rows)

        def stack(key, w, fill):
            out = []
            for b, r in rows:
                t = getattr(b["gen"], key)[r]
                if t.dim() == 1 and w is not None:
                    t = torch.cat([t, torch.full((w - t.shape[0],), fill, dtype=t.dtype)])
                out.append(t)
            return torch.stack(out)

        gen = GenerationOutput(
            tokens=stack("tokens", width, self.tokenizer.pad_id),
            prompt_lengths=stack("prompt_lengths", None, 0),
            responses=stack("responses", n_resp, self.tokenizer.pad_id),
            response_lengths=stack("response_lengths", None, 0),
            log_probs=stack("log_probs", n_resp, 0.0),
            truncated=stack("truncated", None, False))
        return {"prompts": prompts, "gen": gen, "records": records, "tries": tries,
                "scores": torch.stack([b["scores"][r] for b, r in rows]),
                "rewards": torch.stack([b["rewards"][r] for b, r in rows])}

    def rl_step(self) -> dict:
        from megatron_longact.generation import ModelParallelGroups, sequence_log_probs
        from megatron_longact.rl.advantages import compute_advantages
        from megatron_longact.rl.batch_stats import global_batch_counts
        from megatron_longact.rl.dapo import overlong_filter
        from megatron_longact.rl.on_policy import needs_old_log_prob_forward
        from megatron_longact.training.engine import reduce_last_stage, train_step

        cfg, rl = self.cfg, self.cfg.rl
        t0 = time.monotonic()
        batch = self._collect()
        gen = batch["gen"]
        n = len(batch["prompts"])
        t_rollout = time.monotonic() - t0

        from megatron_longact.training.batching import shift_left

        # Full sequences (prompt + response) padded for the layout, and the response positions.
        # Masks and log-probs in prediction space keep the full width S (column j predicts token
        # j+1, the last column predicts nothing) so that the CP split cuts them like the tokens.
        seqs = [batch["prompts"][i] + gen.response_ids(i) for i in range(n)]
        tokens, valid = _pad_batch(seqs, self.tokenizer.pad_id, cfg.model.max_position_embeddings,
                                   self.layout)
        S = tokens.shape[1]
        resp_BS = torch.zeros(n, S, dtype=torch.bool)
        for i in range(n):
            p, r = len(batch["prompts"][i]), int(gen.response_lengths[i])
            resp_BS[i, p:p + r] = True
        labels = shift_left(tokens, self.tokenizer.pad_id)
        resp_pred = shift_left(resp_BS, False)
        resp_mask = resp_pred.float()
        if rl.overlong_filter:
            resp_mask = overlong_filter(resp_mask, gen.truncated.bool())
        advantage_name = rl.advantage or ("dr_grpo" if rl.algorithm == "dr_grpo" else "grpo")
        adv = compute_advantages(advantage_name, batch["rewards"].float(), rl.group_size)
        groups = ModelParallelGroups.from_parallel_state()
        # On-policy (one epoch, one mini-batch): the update's own detached log-probs serve as the
        # old ones and no forward runs here (rl/on_policy.py); micro-batches then carry no old_lp.
        old_lp = None
        # An external engine's log-probs come from other numerics: the ratio's pi_old is always
        # megatron's own forward. The IS correction needs it before the update (it reweights the
        # advantages); the mismatch metric alone is measured on the update pass when on-policy.
        external = self.rollout is not None and self.rollout.external
        tis = external and cfg.rollout.is_correction == "tis"

        def teacher_forced_log_probs(model) -> torch.Tensor:
            return _full_width(sequence_log_probs(
                model, tokens.to(self.runtime.device), vocab_size=self.tokenizer.vocab_size,
                temperature=rl.temperature, micro_batch_size=cfg.train.micro_batch_size, groups=groups,
                cp_group=_cp_group(self.cp)).cpu())

        if tis or needs_old_log_prob_forward(rl.ppo_epochs, rl.mini_batches, rl.old_log_probs):
            old_lp = teacher_forced_log_probs(self.engine.model[0])
        # Reference log-probs for the KL term (rl.kl_coef > 0); zeros stand in otherwise.
        ref_lp = torch.zeros(n, S)
        if self.ref_model is not None:
            ref_lp = teacher_forced_log_probs(self.ref_model)
        rollout_metrics, engine_lp = {}, None
        if external:
            engine_lp = self._engine_log_probs(batch, gen, S)
            if old_lp is not None:
                adv, rollout_metrics = self._mismatch(engine_lp, old_lp, resp_mask, adv)
                engine_lp = None  # measured; the update pass need not carry it

        loss_cfg = {k: getattr(rl, k) for k in ("clip_ratio", "clip_low", "clip_high", "clip_ratio_c",
                                                "loss_agg_mode", "loss_scale_factor")
                    if getattr(rl, k) is not None}
        if rl.algorithm == "dr_grpo" and "loss_scale_factor" not in loss_cfg:
            loss_cfg["loss_scale_factor"] = float(rl.max_new_tokens)
        # Without old log-probs (on-policy) the update pass, the same teacher-forced forward at the
        # sampling temperature, measures the entropy estimate below: the sampler's own log-probs
        # would not do, an external engine's being those after top-k/top-p.
        entropy_mask = resp_pred.float() if old_lp is None else None
        mb = cfg.train.micro_batch_size
        per_mini = n // rl.mini_batches
        metrics_acc: dict[str, list[float]] = {}
        grad_norms, skipped = [], 0
        t1 = time.monotonic()
        for _ in range(rl.ppo_epochs):
            for m in range(rl.mini_batches):
                rows = slice(m * per_mini, (m + 1) * per_mini)
                counts = global_batch_counts(resp_mask[rows], _dp_group())
                n_mb = math.ceil(per_mini / mb)
                scale = n_mb * self.dp
                mbs = []
                for j in range(rows.start, rows.stop, mb):
                    sl = slice(j, min(j + mb, rows.stop))
                    mbs.append(self._cp_part({k: v[sl] for k, v in dict(
                        tokens=tokens, labels=labels, valid=valid, resp_BS=resp_BS, resp_mask=resp_mask,
                        old_lp=old_lp, ref_lp=ref_lp, adv=adv, engine_lp=engine_lp,
                        entropy_mask=entropy_mask).items() if v is not None}))
                fwd = partial(_rl_forward_step, self.handle, rl.algorithm, loss_cfg,
                              counts.loss_kwargs(), scale, self.tokenizer.vocab_size, rl.temperature,
                              (rl.kl_coef, rl.kl_estimator) if self.ref_model is not None else None,
                              _cp_group(self.cp), self.out_window)
                out = train_step(self.engine, fwd, iter(mbs), len(mbs), S, mb)
                self._after_update(out)
                skipped += int(out["skipped"])
                if not out["skipped"]:
                    grad_norms.append(out["grad_norm"])
                for d in out["losses"]:
                    for k, v in d.items():
                        metrics_acc.setdefault(k, []).append(float(v))
        t_update = time.monotonic() - t1
        if engine_lp is not None:  # the mismatch, as the first (only) update pass measured it
            parts = [metrics_acc.pop(k, []) for k in _MISMATCH_KEYS]
            rollout_metrics = self._mismatch_metrics(reduce_last_stage(parts[0], "sum"),
                                                     reduce_last_stage(parts[1], "sum"),
                                                     reduce_last_stage(parts[2], "max"))
        # Policy entropy, Monte-Carlo estimate: mean -log p (at the sampling temperature) of the
        # sampled response tokens under the policy that sampled them, teacher-forced: old_lp, or
        # the update pass's log-probs (already summed over micro-batches and DP ranks).
        if old_lp is not None:
            entropy = collectives.all_reduce_values(
                [float(-(old_lp * resp_pred.float()).sum()), float(resp_pred.sum())], _dp_group())
        else:
            entropy = [reduce_last_stage(metrics_acc.pop(k, []), "sum") for k in _ENTROPY_KEYS]
        metrics = _reduce_metrics(metrics_acc)
        scores, rewards = batch["scores"], batch["rewards"]
        local = collectives.all_reduce_values(
            [scores.sum(), (scores >= 1.0).float().sum(), rewards.sum(),
             gen.response_lengths.float().sum(), float(n), float(valid.sum()), float(batch["tries"])],
            _dp_group())
        count = float(local[4])
        metrics.update({
            "rl/score": float(local[0]) / count, "rl/accuracy": float(local[1]) / count,
            "rl/reward": float(local[2]) / count, "rl/response_length": float(local[3]) / count,
            "rl/sampling_tries": float(local[6]) / self.dp,
            "rl/entropy": entropy[0] / max(entropy[1], 1.0),
            "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "train/lr": out["lr"], "train/skipped_updates": float(skipped),
            "perf/rollout_seconds": t_rollout, "perf/update_seconds": t_update,
            "perf/tokens": float(local[5]),
        })
        metrics.update(rollout_metrics)
        return metrics

    @staticmethod
    def _engine_log_probs(batch, gen, width) -> torch.Tensor:
        """The engine's log-probs of the sampled tokens in prediction space at the full width,
        like old_lp and resp_mask (the CP split cuts them)."""
        from megatron_longact.rollout import mismatch

        return _full_width(mismatch.engine_log_probs_BT(gen, [len(p) for p in batch["prompts"]], width))

    def _mismatch_metrics(self, total: float, count: float, top: float) -> dict:
        return {"rollout/mismatch_mean": total / max(count, 1.0), "rollout/mismatch_max": top,
                "perf/weight_sync_seconds": getattr(self.rollout, "last_sync_seconds", 0.0)}

    def _mismatch(self, engine_lp, old_lp, resp_mask, adv) -> tuple[torch.Tensor, dict]:
        """Training-inference mismatch of this step against the recomputed old log-probs (logged)
        and, with rollout.is_correction tis, the importance-weighted advantages
        (megatron_longact.rollout.mismatch)."""
        from megatron_longact.rollout import mismatch

        total, count, top = mismatch.mismatch_stats(engine_lp, old_lp, resp_mask)
        s, c = collectives.all_reduce_values([total, count], _dp_group())
        top = collectives.all_reduce_values([top], _dp_group(), op="max")[0]
        out = self._mismatch_metrics(s, c, top)
        ro = self.cfg.rollout
        if ro.is_correction == "tis":
            w = mismatch.tis_weights(old_lp, engine_lp, resp_mask, ro.is_cap)
            m = resp_mask.bool()
            ws, wc, clipped = collectives.all_reduce_values(
                [float(w[m].sum()), float(m.sum()), float((w[m] >= ro.is_cap).sum())], _dp_group())
            out.update({"rollout/is_weight_mean": ws / max(wc, 1.0),
                        "rollout/is_clipped_fraction": clipped / max(wc, 1.0)})
            adv = mismatch.apply_tis(adv, w)
        return adv, out

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict | None:
        from megatron_longact.tasks.ruler import RulerConfig, generate_ruler
        from megatron_longact.tasks.suite import EvalResults, summarize, write_report

        ev = self.cfg.evaluation
        if not ev.lengths:
            return None
        base = self.cfg.data.ruler
        rcfg = RulerConfig(tasks=list(ev.tasks), lengths=list(ev.lengths), num_samples=ev.num_samples,
                           seed=ev.seed, template=base.template, number_digits=base.number_digits)
        records = generate_ruler(rcfg, self.tokenizer, self.cfg.data.prompt)
        n = len(records)
        local = records[self.dp_rank * n // self.dp:(self.dp_rank + 1) * n // self.dp]
        if self.handle is not None:
            self.handle.set_collecting(False)
        try:
            samples = self._evaluate_samples(local)
        finally:
            if self.handle is not None:
                self.handle.set_collecting(True)
        if not self.rank0:
            return None
        results = EvalResults(samples=samples, summary=summarize(samples))
        paths = write_report(results, self.out_dir / "eval", log_dir=str(self.out_dir / "tb"),
                             step=self.step, title=f"Evaluation after step {self.step}")
        _info(Path(paths["markdown"]).read_text())
        return results.summary

    def _evaluate_samples(self, local: list[dict]) -> list:
        from megatron.core import parallel_state as ps

        from megatron_longact.data.tokenizer import encode_prompt_text
        from megatron_longact.generation import SamplingConfig
        from megatron_longact.tasks.suite import evaluate

        engine = self._rollout_engine()
        engine.ensure_synced(strict=True)  # evaluate the policy itself, not a lagging copy

        def generate_fn(texts, max_new_tokens):
            prompts = [encode_prompt_text(t, self.tokenizer, self.cfg.data.prompt) for t in texts]
            out = engine.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
            return [self.tokenizer.decode(out.response_ids(i)) for i in range(len(texts))]

        results = evaluate(local, generate_fn, tokenizer=self.tokenizer, prompt=self.cfg.data.prompt,
                           batch_size=16, pass_max_new_tokens=True)
        samples = results.samples
        if self.dp > 1:
            parts = collectives.all_gather_object(samples, ps.get_data_parallel_group())
            samples = [s for part in parts for s in part]
        return samples

    # -- loop --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Run the next step as :meth:`run` does and return its metrics: an SFT step for the first
        ``sft.steps`` steps, an RL step after (with LongAct's metrics). Then advance ``self.step``
        and hand the rollout engine the new weights (every ``rollout.sync_interval`` RL steps; an
        SFT step only marks them stale, the next generation syncs first).

        For loops of one's own (benchmarks, notebooks, interleaving several trainers); ``run``
        adds resume, logging, checkpoints, stop requests and the final evaluation around it."""
        if self.step >= self.total_steps:
            # The learning-rate schedule, the data order and the checkpoints are laid out for
            # exactly sft.steps + train.steps steps.
            raise RuntimeError(f"train_step: all {self.total_steps} steps of this run are done "
                               f"(sft.steps={self.sft_steps} + train.steps={self.rl_steps}); "
                               "raise train.steps for more")
        if self.step < self.sft_steps:
            metrics = self.sft_step()
        else:
            self._start_rl()
            if self.handle is not None:  # full statistics only for the heatmap's steps
                every = self.cfg.longact.heatmap_interval
                self.handle.longact.retain_stats = bool(every) and self.step % every == 0
            metrics = self.rl_step()
            if self.handle is not None:
                metrics.update(self.handle.metrics)
        self.step += 1
        if self.rollout is not None:
            if self.step > self.sft_steps:
                self.rollout.after_update(self.step - self.sft_steps)
            else:
                self.rollout.invalidate()
        return metrics

    def _log(self, step: int, metrics: dict, elapsed: float, bar) -> None:
        from megatron_longact.training import logs

        if self.prompt_report is not None:
            # This rank's prompts so far; the filter counts are global.
            metrics = {**metrics, **self.prompt_report.metrics(),
                       "data/prompts_truncated": float(self.prompts_truncated)}
        self.history.append({"step": step, **metrics})
        self.clock.add(elapsed)
        if not self.rank0:
            return
        scalars = {**metrics, "perf/tokens_per_second": metrics.get("perf/tokens", 0.0) / max(elapsed, 1e-9),
                   "perf/seconds_per_step": elapsed}
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step)
        if self.handle is not None and self.cfg.longact.heatmap_interval and \
                step % self.cfg.longact.heatmap_interval == 0:
            from megatron_longact.longact.figures import log_saliency_figures

            log_saliency_figures(self.handle.longact, step, self.cfg.longact.keep_ratio,
                                 self.out_dir / "figures", self.writer, self.wandb)
        phase = logs.phase_of(step, self.sft_steps, self.total_steps)[0]
        if not bar.disable and getattr(bar, "desc", phase) != phase:
            bar.set_description_str(phase, refresh=False)
        bar.set_postfix_str(logs.console_postfix(metrics), refresh=False)
        bar.update(1)
        if step % self.cfg.train.log_interval == 0 or step == self.total_steps - 1:
            line = logs.format_line(step, self.total_steps, self.sft_steps, metrics, elapsed, self.clock)
            if bar.disable:
                logs.get_logger().info(line)
            else:
                bar.write(line)

    def run(self) -> list[dict]:
        from tqdm import tqdm

        import sys

        from megatron_longact.training import logs

        logs.setup_logging(self.runtime.rank, self.cfg.output.log_all_ranks)
        self.clock = logs.StepClock()
        if self.rank0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            if self.cfg.output.wandb:
                self.wandb = logs.WandbLogger(self.cfg, str(self.out_dir))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            self.maybe_resume()
            # The bar only with a terminal; log files get the full lines of format_line instead.
            bar = tqdm(total=self.total_steps, initial=self.step,
                       disable=not (self.rank0 and sys.stdout.isatty()), dynamic_ncols=True,
                       desc=logs.phase_of(self.step, self.sft_steps, self.total_steps)[0])
            while self.step < self.total_steps:
                t0 = time.monotonic()
                metrics = self.train_step()
                self._log(self.step - 1, metrics, time.monotonic() - t0, bar)
                interval = self.cfg.checkpoint.interval
                self.finish_save(blocking=False)
                if self._stop_requested():
                    if self.rank0:
                        bar.write(f"stop requested by signal: saving at step {self.step} and exiting")
                    self.save()
                    self.finish_save()
                    return self.history
                if interval and self.step % interval == 0 and self.step < self.total_steps:
                    self.save()
            bar.close()
            if self.total_steps:
                self.save()
            self.finish_save()
            summary = self.evaluate()
            if self.rank0:
                import json

                (self.out_dir / "history.json").write_text(json.dumps(
                    {"history": self.history, "evaluation": summary}, indent=1, default=float))
        finally:
            if self.rollout is not None:
                self.rollout.close()
                self.rollout = None
            for s, h in old.items():
                signal.signal(s, h)
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.close()
        return self.history


def _info(message: str) -> None:
    from megatron_longact.training.logs import get_logger

    get_logger().info(message)


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _cp_group(cp: int):
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if cp > 1 else None


def _full_width(lp_BS1: torch.Tensor) -> torch.Tensor:
    """[B, S-1] log-probs (column t predicts token t+1) to the full width S, last column 0."""
    return torch.cat([lp_BS1, torch.zeros(lp_BS1.shape[0], 1, dtype=lp_BS1.dtype)], dim=1)


# How CP ranks combine per-micro-batch metrics of their parts into the whole rows' value: shares of
# a sum add up, extremes take the extreme, everything else is a token mean weighted by the rank's
# tokens. num_seqs is recounted on whole rows by the caller.
# Sum, token count and largest |engine - megatron| log-prob difference of the response tokens,
# measured on the update pass when no old log-probs were recomputed (rollout.mismatch_sums).
_MISMATCH_KEYS = ("mismatch_sum", "mismatch_count", "mismatch_max")
# Sum of -log p and token count of the sampled response tokens, measured on the update pass when no
# old log-probs were recomputed (the rl/entropy estimate).
_ENTROPY_KEYS = ("entropy_sum", "entropy_count")
_CP_SUM = ("pg_loss", "sft_loss", "num_tokens") + _MISMATCH_KEYS[:2] + _ENTROPY_KEYS
_CP_MIN = ("ratio_min",)
_CP_MAX = ("ratio_max", "mismatch_max")


def _cp_reduce_metrics(metrics: dict, cp_group, num_tokens=None) -> dict:
    """Detached per-micro-batch metrics of this CP rank's part -> those of the whole rows, on every
    CP rank of ``cp_group`` (None: unchanged). ``num_tokens`` weights the token means."""
    if cp_group is None:
        return metrics
    names = sorted(metrics)
    sums = [k for k in names if k not in _CP_MIN + _CP_MAX]
    weight = (num_tokens if num_tokens is not None else torch.ones(())).float()
    vals = torch.stack([metrics[k].float() * (1.0 if k in _CP_SUM else weight) for k in sums] + [weight])
    collectives.all_reduce(vals, cp_group)
    total_w = vals[-1].clamp(min=1.0)
    out = {k: (v if k in _CP_SUM else v / total_w) for k, v in zip(sums, vals[:-1])}
    for keys, op in ((_CP_MIN, "min"), (_CP_MAX, "max")):
        present = [k for k in names if k in keys]
        if present:
            t = torch.stack([metrics[k].float() for k in present])
            collectives.all_reduce(t, cp_group, op)
            out.update(zip(present, t))
    return out


def _sft_forward_step(scale, cp_group, data_iterator, model):
    mb = next(data_iterator)
    tokens, labels, mask = mb["tokens"], mb["labels"], mb["mask"]
    output = model(tokens, mb["position_ids"], None, labels=labels)

    def loss_func(output_tensor):
        # Local sum / global token count, times (micro-batches x DP) to undo megatron's averaging
        # (megatron multiplies by CP itself); the mean of the logged values over micro-batches and
        # DP ranks is the global per-token loss.
        loss = (output_tensor.float() * mask).sum() * scale
        return loss, _cp_reduce_metrics({"sft_loss": loss.detach().clone()}, cp_group)

    return output, loss_func


# Micro-batch entries in prediction space that only the RL loss reads (cut to the output window).
_LOSS_COLUMNS = ("labels", "resp_mask", "old_lp", "ref_lp", "adv", "engine_lp", "entropy_mask")


def _rl_forward_step(handle, algorithm, loss_cfg, counts, scale, vocab_size, temperature, kl, cp_group,
                     out_window, data_iterator, model):
    """One micro-batch of the policy loss (plus ``kl = (coef, estimator)`` times the KL to the
    reference, aggregated with the policy loss's mode and global counts, as GRPO adds it). The
    tensors of the micro-batch are this CP rank's parts (``cp_group`` None without CP).

    ``out_window`` (the last stage's :class:`~megatron_longact.models.output_window.OutputWindow`,
    None elsewhere): the model computes logits only over the columns that hold response tokens of
    this micro-batch part, and the loss cuts its labels, masks and log-probs to the same columns;
    every other column has a zero response mask, so losses, metrics and gradients are unchanged."""
    from megatron_longact.generation import vocab_parallel_log_probs
    from megatron_longact.rl.kl import kl_loss
    from megatron_longact.rollout.mismatch import mismatch_sums
    from megatron_longact.rl.losses import policy_loss, resolve_settings

    mb = next(data_iterator)
    tokens = mb["tokens"]
    if handle is not None:
        handle.begin_microbatch(mb["valid"], mb["resp_BS"])
    if out_window is not None:
        out_window.set(out_window.of_mask(mb["resp_mask"]))
        try:
            output = model(tokens, mb["position_ids"], None)
        finally:
            window = out_window.window
            out_window.set(None)
        if window is not None:
            # Everything the loss reads per column (advantages too when they are per token, as
            # with rollout.is_correction: tis); the model's inputs keep the full width.
            width = tokens.shape[1]
            mb = {k: (v[:, window] if k in _LOSS_COLUMNS and torch.is_tensor(v) and v.dim() == 2
                      and v.shape[1] == width else v) for k, v in mb.items()}
    else:
        output = model(tokens, mb["position_ids"], None)

    def loss_func(logits_BSV):
        # Labels were shifted before the CP split: column t of this part predicts labels[t]; the
        # full row's last column predicts nothing (masked) and its pad label is clamped.
        logp = vocab_parallel_log_probs(logits_BSV, mb["labels"].clamp(max=vocab_size - 1),
                                        vocab_size=vocab_size, temperature=temperature)
        # No old_lp: the update is on-policy and pi_old is this very forward (rl/on_policy.py).
        old_lp = mb["old_lp"] if "old_lp" in mb else logp.detach()
        loss, metrics = policy_loss(algorithm, logp, old_lp, mb["adv"], mb["resp_mask"],
                                    cp_group=cp_group, **loss_cfg, **counts)
        if kl is not None:
            coef, estimator = kl
            mode = resolve_settings(algorithm, **loss_cfg).loss_agg_mode
            kl_term, kl_metrics = kl_loss(logp, mb["ref_lp"], mb["resp_mask"], estimator, mode,
                                          loss_scale_factor=loss_cfg.get("loss_scale_factor"),
                                          cp_group=cp_group, **counts)
            loss = loss + coef * kl_term
            metrics = {**metrics, **kl_metrics}
        if "engine_lp" in mb:  # the training-inference mismatch against this very forward
            metrics = {**metrics, **dict(zip(_MISMATCH_KEYS, mismatch_sums(
                mb["engine_lp"], logp.detach(), mb["resp_mask"])))}
        if "entropy_mask" in mb:  # the entropy estimate's share of this micro-batch
            ent = mb["entropy_mask"]
            metrics = {**metrics, "entropy_sum": -(logp.detach() * ent).sum(), "entropy_count": ent.sum()}
        out = {k: v.detach().float().clone() for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if cp_group is not None:
            out = _cp_reduce_metrics(out, cp_group, num_tokens=out.get("num_tokens"))
            # A response whose tokens sit on several CP ranks is one response.
            nonempty_B = (mb["resp_mask"] > 0).any(-1).float()
            out["num_seqs"] = collectives.all_reduce(nonempty_B, cp_group, "max").sum()
        return loss * scale, out

    return output, loss_func


def _reduce_metrics(acc: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each per-micro-batch metric over micro-batches and DP ranks (last stage)."""
    from megatron.core import parallel_state as ps

    from megatron_longact.training.engine import reduce_last_stage_mean

    # Every rank of the last stage has the same names; other stages learn them by broadcast.
    pp = ps.get_pipeline_model_parallel_world_size()
    names = collectives.broadcast_object(sorted(acc), pp - 1, ps.get_pipeline_model_parallel_group()) \
        if pp > 1 else sorted(acc)
    out = {}
    for name in names:
        key = name if "/" in name else f"rl/{name}"
        out[key] = reduce_last_stage_mean(acc.get(name, [0.0]))
    return out
