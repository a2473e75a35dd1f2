"""The masked softmax cross-entropy loss of the chapter, on the fused op."""
import torch
from torch import nn

from . import ops, reference

__all__ = ["MaskedSoftmaxCELoss"]


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """The softmax cross-entropy loss with masks, as d2l's (a subclass of ``nn.CrossEntropyLoss``).

    ``forward(pred, label, valid_len)``: pred (batch_size, num_steps, vocab_size), label
    (batch_size, num_steps), valid_len (batch_size,) -> per-sequence loss (batch_size,), the mean
    over all ``num_steps`` with masked steps contributing 0 (the divisor is ``num_steps``, not
    ``valid_len``). Under the extension backend one fused op computes it and its gradient.

    ``nn.CrossEntropyLoss``'s ``weight``, ``label_smoothing`` and ``ignore_index``, when set,
    are honoured as d2l's class honours them: such a loss runs ``nn.CrossEntropyLoss``'s own
    forward under the mask (the fused op computes the plain loss only). With the default
    ``ignore_index`` (-100) a label of -100 is refused as out of range by the fused op, where
    d2l's counts it as 0.
    """

    def forward(self, pred, label, valid_len):
        self.reduction = 'none'
        if self.weight is not None or self.label_smoothing or self.ignore_index != -100:
            mask = reference.sequence_mask(torch.ones_like(label), valid_len)
            return (super().forward(pred.permute(0, 2, 1), label) * mask).mean(dim=1)
        return ops.masked_softmax_ce(pred, label, valid_len)
