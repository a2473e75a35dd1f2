"""The masked softmax cross-entropy loss of the chapter, on the fused op."""
from torch import nn

from . import ops

__all__ = ["MaskedSoftmaxCELoss"]


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """The softmax cross-entropy loss with masks, as d2l's (a subclass of ``nn.CrossEntropyLoss``).

    ``forward(pred, label, valid_len)``: pred (batch_size, num_steps, vocab_size), label
    (batch_size, num_steps), valid_len (batch_size,) -> per-sequence loss (batch_size,), the mean
    over all ``num_steps`` with masked steps contributing 0 (the divisor is ``num_steps``, not
    ``valid_len``). Under the extension backend one fused op computes it and its gradient.
    """

    def forward(self, pred, label, valid_len):
        self.reduction = 'none'
        return ops.masked_softmax_ce(pred, label, valid_len)
