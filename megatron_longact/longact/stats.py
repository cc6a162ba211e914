"""Q/K activation statistics collected with module hooks on megatron-core attention.

Hook points (the same for the local and the Transformer Engine layer specs, which both build
``q_layernorm`` / ``k_layernorm`` modules, an ``IdentityOp`` when the model has no QK-norm):
- ``pre_rope``: forward hooks on ``self_attention.q_layernorm`` and ``k_layernorm``; their
  outputs are the projection after QK-norm and before RoPE, exactly what the masked W_Q/W_K rows
  produce.
- ``post_rope``: a forward pre-hook on ``self_attention.core_attention``; its query/key inputs are
  what attention consumes. RoPE rotates channel pairs (d, d + D/2), so the per-channel value used is
  the pair norm, which RoPE leaves unchanged.
- ``v`` (optional, ``collect_v=True``; off in training): the value input of the same
  ``core_attention`` pre-hook, ``|v|`` per channel (no RoPE, so no pair norm), whatever ``point``
  is. LongAct never masks W_V; the statistic is a control for diagnostics (``longact-probe``).

Tensors seen by the hooks: ``q_SBHD`` [seq, batch, local query heads, head dim] and ``k_SBGD``
[seq, batch, local key groups, head dim]. Accumulators are fp32, detached, indexed by
(stage-local layer, global channel) so that the cross-rank reduction is a plain sum.

Activation recomputation re-runs layer forwards during backward. Each micro-batch gets an id when
the model chunk's forward starts (a forward pre-hook on the GPTModel; recomputation re-runs layers,
never the model's own forward); a hook that fires a second time for the same (layer, id) is a
recomputation and is ignored. Under pipeline schedules the recomputation of micro-batch j happens
after a later micro-batch's forward has already passed every layer of the stage, so the same rule
holds. :meth:`StatsCollector.begin_microbatch` attaches a token mask to the next forward.

Only forwards that build an autograd graph are counted (``torch.is_grad_enabled()`` inside the
hook): no-grad forwards are never update passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_longact.longact.layout import QKGeometry
from megatron_longact.runtime import collectives


@dataclass
class GlobalStats:
    """Statistics of the whole global batch, identical on every rank.

    ``q_LC`` [L, Cq] and ``k_LC`` [L, Ck] in global channel order; ``tokens_L`` [L] counts;
    ``v_LC`` [L, Ck] (value channels, same layout as the key channels) only with ``collect_v``.
    """

    q_LC: torch.Tensor
    k_LC: torch.Tensor
    tokens_L: torch.Tensor
    v_LC: torch.Tensor | None = None


class StatsCollector:
    """Accumulates per-channel Q/K statistics of this rank's layers over the micro-batches of a step.

    Usage per optimizer step::

        collector.begin_microbatch(token_mask_SB)   # before each micro-batch's forward
        ...forward/backward through megatron's schedule...
        stats = collector.reduce(dp_cp_group=..., tp_group=..., pp_group=...)  # then reset
    """

    def __init__(self, gpt_models: list, geometry: QKGeometry, *, stat: str = "mean_abs",
                 point: str = "pre_rope", tp_rank: int = 0, tp_size: int = 1,
                 collect_v: bool = False):
        self.geometry = geometry
        self.stat = stat
        self.point = point
        self.collect_v = collect_v
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.enabled = True
        heads, groups, owner = geometry.local_heads(tp_rank, tp_size)
        D = geometry.head_dim
        # Global channel indices of this rank's local heads/groups, flattened as [heads * D].
        q_idx = (heads[:, None] * D + torch.arange(D)).reshape(-1)
        k_idx = (groups[:, None] * D + torch.arange(D)).reshape(-1)
        # A rank's heads and groups are consecutive, so its channels are one range of the global
        # channels: a micro-batch's sum is added to that slice by the product itself (addmm_).
        # With fewer key groups than TP ranks a rank computes one group, and only its owner
        # reports it: the other ranks add nothing for K (and V).
        self._q_range = _as_range(q_idx)
        self._k_range = _as_range(k_idx)
        self._k_reports = bool(owner.all())
        if owner.any() and not self._k_reports:
            raise AssertionError("LongAct: a TP rank owns only some of its key groups")
        self._layers: list[int] = []  # global layer index of each stage-local slot
        self._layers_dev: torch.Tensor | None = None  # the same on the accumulators' device
        self._handles = []
        self._device = None
        self._q = None  # accumulators: made by reset()
        self._mb_id = 0
        self._token_mask_SB: torch.Tensor | None = None
        self._mask_cache = None  # (key, fp32 mask, token count) of the current micro-batch
        self._announced = False
        self._seen: dict[tuple[int, str], int] = {}
        for model in gpt_models:
            if isinstance(model, torch.nn.Module):
                self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
            for layer in model.decoder.layers:
                self._attach(layer)
        self.reset()

    # -- hooks -------------------------------------------------------------------------------
    def _attach(self, layer) -> None:
        attn = layer.self_attention
        slot = len(self._layers)
        self._layers.append(layer.layer_number - 1)
        self._layers_dev = None
        if self.point == "pre_rope":
            for which, module in (("q", attn.q_layernorm), ("k", attn.k_layernorm)):
                if not isinstance(module, torch.nn.Module):
                    raise NotImplementedError(
                        "longact.point=pre_rope hooks self_attention.q_layernorm/k_layernorm; this "
                        "layer spec builds none (use a megatron GPT layer spec or point=post_rope)"
                    )
                self._handles.append(module.register_forward_hook(self._make_output_hook(slot, which)))
        if self.point != "pre_rope" or self.collect_v:
            self._handles.append(attn.core_attention.register_forward_pre_hook(
                self._make_core_attention_hook(slot), with_kwargs=True))

    def _make_output_hook(self, slot: int, which: str):
        def hook(module, inputs, output):
            self._observe(slot, which, output)
        return hook

    def _make_core_attention_hook(self, slot: int):
        def hook(module, args, kwargs):
            if self.point != "pre_rope":
                query = args[0] if len(args) > 0 else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs["key"]
                self._observe(slot, "q", query)
                self._observe(slot, "k", key)
            if self.collect_v:
                self._observe(slot, "v", args[2] if len(args) > 2 else kwargs["value"])
        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- accumulation ------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the accumulators (after each reduction). Once they exist they are zeroed in
        place, so the per-slot views the hooks add into stay valid."""
        if self._q is not None and self._q.shape[0] == len(self._layers):
            for t in self.accumulators():
                t.zero_()
        else:
            n, g = len(self._layers), self.geometry
            device = self._device or torch.device("cpu")
            self._set_accumulators(
                torch.zeros(n, g.q_channels, dtype=torch.float32, device=device),
                torch.zeros(n, g.k_channels, dtype=torch.float32, device=device),
                torch.zeros(n, g.k_channels if self.collect_v else 0, dtype=torch.float32, device=device),
                torch.zeros(n, dtype=torch.float64, device=device))
        self._seen.clear()

    def _set_accumulators(self, q, k, v, count) -> None:
        """Hold these accumulators, and for each stage-local slot the views a hook adds into:
        this rank's channel range of the slot's row as [1, channels] (Q, K and V) and its token
        count as [1]. Made once here instead of in every hook call."""
        self._q, self._k, self._v, self._count = q, k, v, count
        (qlo, qhi), (klo, khi) = self._q_range, self._k_range
        n = len(self._layers)
        self._rows = {"q": [q[i, qlo:qhi].view(1, -1) for i in range(n)],
                      "k": [k[i, klo:khi].view(1, -1) for i in range(n)],
                      "v": [v[i, klo:khi].view(1, -1) for i in range(n)] if self.collect_v else []}
        self._count_rows = [count[i:i + 1] for i in range(n)]

    def accumulators(self) -> list[torch.Tensor]:
        """The per-step accumulators (Q, K, V sums and token counts) this collector holds."""
        return [self._q, self._k, self._v, self._count]

    def set_layer_slots(self, layers: list[int]) -> None:
        """Give a collector without hooks the global layer index of each slot (memory accounting
        and tests: a collector over no model has none)."""
        if self._handles:
            raise RuntimeError("set_layer_slots: this collector has hooks on a model's layers")
        self._layers = list(layers)
        self._layers_dev = None
        self.reset()

    def _to_device(self, device: torch.device) -> None:
        # Accumulate where the activations live: no host sync inside the forward pass.
        self._device = device
        self._set_accumulators(*(t.to(device) for t in self.accumulators()))

    def begin_microbatch(self, token_mask_SB: torch.Tensor | None = None) -> None:
        """Announce the next micro-batch; ``token_mask_SB`` [seq, batch] selects counted tokens
        (None counts all). Pass the mask in the same sequence layout the model sees (this CP
        rank's chunk under context parallelism). Without an announcement every model forward
        counts as a new micro-batch with all tokens."""
        self._mb_id += 1
        self._announced = True
        self._token_mask_SB = None if token_mask_SB is None else token_mask_SB.detach()

    def _on_model_forward(self, module, args) -> None:
        if self._announced:
            self._announced = False  # this forward is the announced micro-batch
        else:
            self._mb_id += 1
            self._token_mask_SB = None

    def _observe(self, slot: int, which: str, x_SBND: torch.Tensor) -> None:
        # Only update passes count. A forward that builds no autograd graph (rollouts, old-policy
        # and reference log-probs, evaluation) never does, whether or not its caller remembered
        # set_collecting(False); activation recomputation runs under enable_grad and is
        # deduplicated below.
        if not self.enabled or not torch.is_grad_enabled():
            return
        if x_SBND.dim() != 4:
            raise NotImplementedError(
                f"LongAct statistics expect [seq, batch, heads, dim] q/k tensors, got shape "
                f"{tuple(x_SBND.shape)} (packed THD sequences are not supported)"
            )
        key = (slot, which)
        if self._seen.get(key) == self._mb_id:
            return  # activation recomputation of a micro-batch already counted
        self._seen[key] = self._mb_id
        # Few operations per call: on a GPU each is a launch (and any torch call some host time),
        # and these run for q and k of every layer of every micro-batch. x is detached, so no
        # graph is recorded without a no_grad context.
        S, B = x_SBND.shape[:2]
        mask_1T, tokens = self._mask(S, B, x_SBND)
        if which == "q":
            self._count_rows[slot].add_(tokens)  # in place on the view: one kernel
        elif not self._k_reports:
            return  # this rank's key group is reported by another TP rank
        acc_1C = self._rows[which][slot]
        x = x_SBND.detach()
        # RoPE pair norms: both channels of a rotated pair get the pair's norm; the statistic is
        # computed on the D/2 pairs and duplicated afterwards (on [heads, D], not on the
        # activations). sqrt(a^2 + b^2) rather than torch.hypot: the same to an ulp for any
        # activation below 1e19, and hypot's scaling makes it 2-3x slower on the CPU.
        paired = self.point == "post_rope" and which != "v"
        if paired:
            own = x.dtype != torch.float32  # .float() copies: the copy may be overwritten
            x = x.float()
            half = x.shape[-1] // 2
            sq = x.square_() if own else x.square()
            x = (sq[..., :half] + sq[..., half:]).sqrt_()
        else:  # |x| in fp32 (abs is exact in any dtype; in place on a converted copy)
            x = x.float().abs_() if x.dtype != torch.float32 else x.abs()
        if self.stat == "max_abs":
            value_ND = (x * mask_1T.view(S, B, 1, 1)).amax(dim=(0, 1))
            if paired:
                value_ND = torch.cat([value_ND, value_ND], dim=-1)
            torch.maximum(acc_1C, value_ND.view(1, -1), out=acc_1C)
            return
        xx = x.square_() if self.stat == "rms" else x
        # sum over (s, b) of mask * xx as one [1, S*B] x [S*B, N*D] product (einsum's permutes
        # cost 2-3x as much on the CPU); unpaired, it adds straight into the accumulator slice
        xx_TC = xx.reshape(S * B, -1)
        if not paired:
            acc_1C.addmm_(mask_1T, xx_TC)
            return
        value_ND = (mask_1T @ xx_TC).view(xx.shape[2:])
        acc_1C += torch.cat([value_ND, value_ND], dim=-1).view(1, -1)

    def _mask(self, S: int, B: int, x_SBND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's token mask as [1, S*B] fp32 on the activations' device and its
        token count (fp64), made once per micro-batch (every layer's q, k and v share them). The
        accumulators move to that device on the first micro-batch that lives there."""
        cached = self._mask_cache
        if cached is not None and cached[0] == (self._mb_id, S, B):
            return cached[1], cached[2]
        device = x_SBND.device
        if self._q.device != device:
            self._to_device(device)
        mask = self._token_mask_SB
        if mask is None:
            mask = torch.ones(S, B, dtype=torch.float32, device=device)
        else:
            if tuple(mask.shape) != (S, B):
                raise ValueError(
                    f"LongAct token mask has shape {tuple(mask.shape)}, but the attention sees "
                    f"[seq={S}, batch={B}]"
                )
            mask = mask.to(device=device, dtype=torch.float32)
        mask_1T = mask.reshape(1, S * B)
        tokens = mask_1T.sum().to(torch.float64)
        self._mask_cache = ((self._mb_id, S, B), mask_1T, tokens)
        return mask_1T, tokens

    # -- reduction ---------------------------------------------------------------------------
    def reduce(self, *, dp_cp_group=None, tp_group=None, pp_group=None,
               reset: bool = True, on_host: bool = True) -> GlobalStats:
        """Global statistics of the step, identical on every rank; on the host, or with
        ``on_host=False`` where the accumulators live (the GPU on a GPU node, so that the selection
        runs there too and only the masks come back to the host).

        1. Sum (max for max_abs) the accumulators and token counts over ``dp_cp_group``: the
           statistic of the whole global batch.
        2. Turn sums into the statistic (mean or root mean square).
        3. Assemble whole layers over ``tp_group`` and all layers over ``pp_group``. Each rank
           holds its own channels and layers and zeros elsewhere, so a sum is an exact gather.
        Any group may be None when that dimension has size 1 or no process group exists.
        """
        max_op = self.stat == "max_abs"
        q, k = self._q.clone(), self._k.clone()
        v = self._v.clone() if self.collect_v else None
        count = self._count.clone()
        if _size(dp_cp_group) > 1:
            op = "max" if max_op else "sum"
            collectives.all_reduce(q, dp_cp_group, op)
            collectives.all_reduce(k, dp_cp_group, op)
            if v is not None:
                collectives.all_reduce(v, dp_cp_group, op)
            collectives.all_reduce(count, dp_cp_group)
        if not max_op:
            denom = count.clamp(min=1.0).to(torch.float32)[:, None]
            q, k = q / denom, k / denom
            v = None if v is None else v / denom
            if self.stat == "rms":
                q, k = q.sqrt(), k.sqrt()
                v = None if v is None else v.sqrt()
        L, device = self.geometry.num_layers, q.device
        q_LC = torch.zeros(L, self.geometry.q_channels, device=device)
        k_LC = torch.zeros(L, self.geometry.k_channels, device=device)
        v_LC = None if v is None else torch.zeros(L, self.geometry.k_channels, device=device)
        tokens_L = torch.zeros(L, dtype=torch.float64, device=device)
        layers = self._layer_index(device)
        q_LC[layers] = q
        k_LC[layers] = k
        if v_LC is not None:
            v_LC[layers] = v
        if self.tp_rank == 0:
            tokens_L[layers] = count
        for group in (tp_group, pp_group):
            if _size(group) > 1:
                for t in (q_LC, k_LC, tokens_L) + (() if v_LC is None else (v_LC,)):
                    collectives.all_reduce(t, group)
        if reset:
            self.reset()
        if not on_host:
            return GlobalStats(q_LC, k_LC, tokens_L, v_LC)
        return GlobalStats(q_LC.cpu(), k_LC.cpu(), tokens_L.cpu(),
                           None if v_LC is None else v_LC.cpu())

    def _layer_index(self, device) -> torch.Tensor:
        """The global layer index of each slot, on ``device`` (made once: a host-to-device copy
        per step would wait for the stream)."""
        cached = self._layers_dev
        if cached is None or cached.device != torch.device(device):
            cached = self._layers_dev = torch.tensor(self._layers, dtype=torch.long, device=device)
        return cached


def _as_range(idx: torch.Tensor) -> tuple[int, int]:
    """(first, end) of consecutive channel indices."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    if not torch.equal(idx, torch.arange(lo, hi)):
        raise AssertionError(f"LongAct: a rank's channels are not consecutive ({idx.tolist()[:8]}...)")
    return lo, hi


def _size(group) -> int:
    return 1 if group is None else collectives.size(group)
