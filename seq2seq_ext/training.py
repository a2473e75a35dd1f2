"""Training: the chapter's ``train_seq2seq`` with the same signature, printed output and loss
curve, and d2l's gradient clipping."""
import torch
from torch import nn

from . import reference
from .losses import MaskedSoftmaxCELoss
from .utils import Animator, Timer

__all__ = ["train_seq2seq", "fit", "make_adam", "grad_clipping", "xavier_init_weights"]

xavier_init_weights = reference.xavier_init_weights


def grad_clipping(net, theta):
    """Clip gradients by their global L2 norm, d2l's rule: when the norm exceeds ``theta`` every
    gradient is scaled by ``theta / norm``. Runs without a host synchronisation (the comparison
    happens on the device)."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = torch.where(norm > theta, theta / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, scale)


def make_adam(params, lr):
    """``torch.optim.Adam(params, lr)``, with PyTorch's fused implementation (one kernel for all
    parameters: the same update rule, rounding aside) when every parameter allows it."""
    params = list(params)
    fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def train_seq2seq(net, data_iter, lr, num_epochs, tgt_vocab, device):
    """Train a model for sequence to sequence (d2l's signature, printed line and loss plot).

    The arithmetic is the chapter's; the loss runs as one fused op, and the per-batch loss and
    token counts stay on the device until the epoch ends instead of being synchronised per batch.
    """
    loss, tokens_per_sec = fit(net, data_iter, lr, num_epochs, tgt_vocab, device)
    print(f'loss {loss:.3f}, {tokens_per_sec:.1f} tokens/sec on {str(device)}')


def fit(net, data_iter, lr, num_epochs, tgt_vocab, device, on_epoch=None, plot=True):
    """The loop of :func:`train_seq2seq`. ``on_epoch(epoch, loss, tokens_per_sec)`` is called after
    every epoch (1-based). Returns the last epoch's (loss per token, tokens/sec)."""
    net.apply(xavier_init_weights)
    net.to(device)
    optimizer = make_adam(net.parameters(), lr)
    loss = MaskedSoftmaxCELoss()
    net.train()
    animator = Animator(xlabel='epoch', ylabel='loss', xlim=[10, num_epochs]) if plot else None
    bos_id = tgt_vocab['<bos>']
    epoch_loss, speed = float('nan'), 0.0
    for epoch in range(num_epochs):
        timer = Timer()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        num_tokens = torch.zeros((), dtype=torch.float64, device=device)
        for batch in data_iter:
            optimizer.zero_grad()
            X, X_valid_len, Y, Y_valid_len = [x.to(device) for x in batch]
            bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype, device=device)
            dec_input = torch.cat([bos, Y[:, :-1]], 1)  # teacher forcing
            Y_hat, _ = net(X, dec_input, X_valid_len)
            l = loss(Y_hat, Y, Y_valid_len)
            l.sum().backward()
            grad_clipping(net, 1)
            optimizer.step()
            with torch.no_grad():
                loss_sum += l.sum()
                num_tokens += Y_valid_len.sum()
        tokens = num_tokens.item()
        epoch_loss = loss_sum.item() / tokens
        speed = tokens / timer.stop()
        if animator is not None and (epoch + 1) % 10 == 0:
            animator.add(epoch + 1, (epoch_loss,))
        if on_epoch is not None:
            on_epoch(epoch + 1, epoch_loss, speed)
    return epoch_loss, speed
