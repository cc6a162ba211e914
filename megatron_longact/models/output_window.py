"""Logits only where a loss needs them: a sequence window for megatron's output layer.

The RL loss reads log-probs at response positions only, but megatron's GPTModel applies the output
layer to every position: for a 64k-token context with a short response that is almost all of the
logits' compute and memory (fp32 [tokens, vocab / TP] per micro-batch, twice with the softmax).
:class:`OutputWindow` hooks a GPTModel's ``output_layer`` so that, while a window is set, the layer
sees only those sequence positions of its input: the model then returns logits [b, window, v]
instead of [b, s, v], and the loss cuts its labels and masks to the same columns. Gradients are those of the full computation (positions outside the
window had no loss term; their logits were not needed).

Sequence parallelism: the output layer's input is then split over the tensor-parallel ranks along
the sequence, and the layer all-gathers it itself. The hook does that gather first, cuts the
window, and switches the layer's own gather off for that call (restored right after), as
megatron's GPTModel does when it keeps only the last token's logits; the gradient of the input is
then all-reduced by the layer and split by the hook's gather, which is the reduce-scatter the
layer's own gather does (see ``_pre``).
Context parallelism: the window is in this CP rank's local sequence coordinates (the trainer
computes it from the rank's own part of the response mask).

Index space: ``window`` is a ``slice`` of the local sequence dimension (dim 0 of the output layer's
[s, b, h] input; dim 1 of the [b, s, ...] tensors the loss reads).
"""

from __future__ import annotations

import torch


class OutputWindow:
    """Attach to a GPTModel that has an output layer (the last pipeline stage)."""

    def __init__(self, gpt):
        self.layer = gpt.output_layer
        self.tp_group = getattr(getattr(gpt, "pg_collection", None), "tp", None)
        self.window: slice | None = None
        self._restore_sp = False
        self._handles = [self.layer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.layer.register_forward_hook(self._post)]

    @staticmethod
    def of_mask(mask_BS: torch.Tensor) -> slice | None:
        """The smallest window holding every nonzero column of ``mask_BS`` (None: no column is)."""
        cols = torch.nonzero(mask_BS.reshape(-1, mask_BS.shape[-1]).ne(0).any(0)).flatten()
        if cols.numel() == 0:
            return None
        return slice(int(cols[0]), int(cols[-1]) + 1)

    def set(self, window: slice | None) -> None:
        self.window = window

    def _pre(self, module, args, kwargs):
        if self.window is None:
            return None
        hidden = args[0] if args else kwargs.pop("input_")
        if module.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # Backward: split, no reduction. With its own gather switched off the layer takes its
            # input through copy_to_tensor_model_parallel_region, whose backward all-reduces the
            # input gradient over TP; all-reduce then split is the reduce-scatter the layer's own
            # gather would have done.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
            module.sequence_parallel = False
            self._restore_sp = True
        return (hidden[self.window],) + tuple(args[1:]), kwargs

    def _post(self, module, args, output):
        if self._restore_sp:
            module.sequence_parallel = True
            self._restore_sp = False
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
