"""Training: the chapter's ``train_seq2seq`` with the same signature, printed output and loss
curve, and d2l's gradient clipping.

:func:`fit` is the loop underneath. Beyond the chapter it can resume a run (``optimizer``,
``start_epoch``, ``init_weights``), train with scheduled teacher forcing
(``teacher_forcing_ratio``, the step-wise decoder of :func:`decode_teacher_forced`), under bf16
autocast (``amp="bf16"``), and data-parallel across processes when ``torch.distributed`` is
initialised (see :mod:`seq2seq_ext.distributed`).
"""
import contextlib
import numbers
import random
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from . import _clip_divisor, _fastcall, models, ops, reference
from . import nn as seq2seq_nn
from .losses import MaskedSoftmaxCELoss
from .ops import enable_autocast_rules  # the gru_layer op's autocast rule, kept with the op
from .utils import Animator, Timer, checked_device

__all__ = ["train_seq2seq", "fit", "make_adam", "grad_clipping", "xavier_init_weights",
           "decode_teacher_forced", "enable_autocast_rules", "AMP_MODES"]

#: The values :func:`fit` accepts for ``amp``.
AMP_MODES = (None, "bf16")


def xavier_init_weights(m):
    """The chapter's initialisation: Xavier-uniform for ``nn.Linear`` weights and the weight
    matrices of ``nn.GRU``, the chapter's test ``type(m) == nn.GRU`` extended to the drop-in
    layer :func:`seq2seq_ext.accelerate` puts in an ``nn.GRU``'s place (its class is
    :class:`seq2seq_ext.nn.GRU`), so that an accelerated model starts from the same weights."""
    if type(m) is seq2seq_nn.GRU:
        for name in m._flat_weights_names:
            if "weight" in name:
                nn.init.xavier_uniform_(m._parameters[name])
    else:
        reference.xavier_init_weights(m)


def grad_clipping(net, theta):
    """Clip gradients by their global L2 norm, d2l's rule: when the norm exceeds ``theta`` every
    gradient is scaled by ``theta / norm``. The norm and the scaling are computed by the same
    operations in the same order as d2l's, so that a training loop that calls it gets d2l's
    numbers bit for bit (the comparison reads the norm on the host, as d2l's does; parameters
    without a gradient are left out, where d2l's raises)."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = 0
    for g in grads:
        total = total + torch.sum(g ** 2)
    norm = torch.sqrt(total)
    if norm > theta:
        for g in grads:
            g *= theta / norm


def _clip_global_norm(net, theta):
    """:func:`grad_clipping`'s rule without a host synchronisation (the comparison happens on
    the device; the norm summed by ``_foreach_norm``, so the scaled gradients may differ from
    d2l's in the last bits): :func:`fit`'s step."""
    grads = _clipped_grads(net)
    if not grads:
        return
    norm = _global_norm(grads)
    scale = torch.where(norm > theta, theta / norm, torch.ones_like(norm))
    torch._foreach_mul_(grads, scale)


def _clipped_grads(net):
    return [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]


def _global_norm(grads):
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _clip_and_step(net, theta, optimizer):
    """:func:`fit`'s update: :func:`_clip_global_norm`, then ``optimizer.step()``. A fused Adam
    over exactly ``net``'s float32 parameters (:func:`make_adam`'s) takes the clipping factor
    as its step's gradient divisor instead, which saves a pass over the gradients
    (``seq2seq_ext/_clip_divisor.py``; the same update up to rounding)."""
    params = list(net.parameters())
    if not _clip_divisor.takes_divisor(optimizer, params):
        _clip_global_norm(net, theta)
        optimizer.step()
        return
    grads = _clipped_grads(net)
    if not grads:
        optimizer.step()
        return
    norm = _global_norm(grads).float()
    _clip_divisor.step_with_divisor(
        optimizer, torch.where(norm > theta, norm / theta, torch.ones_like(norm)))


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


def decode_teacher_forced(net, X, dec_input, X_valid_len, teacher_forcing_ratio=1.0):
    """Run an encoder-decoder one decoder step at a time with scheduled teacher forcing.

    ``net`` is an ``EncoderDecoder``; X (batch, src_steps) and X_valid_len (batch,) feed the
    encoder exactly as ``net(X, dec_input, X_valid_len)`` does, and dec_input (batch, steps) is
    the teacher-forced decoder input (``<bos>`` then the label shifted right by one). Step 0
    reads ``dec_input[:, 0]``. Before every step ``t >= 1`` one coin ``random.random() <
    teacher_forcing_ratio`` (Python's ``random``, one coin per step for the whole batch) picks
    the ground truth ``dec_input[:, t]`` or the model's own argmax prediction of step ``t - 1``
    (detached). Each step calls ``net.decoder(X_t, state)`` with ``X_t`` of shape (batch, 1), the
    differentiable path, and passes the state along whatever it is (a tensor or a tuple).

    Returns the logits (batch, steps, vocab), differentiable in every parameter.

    With ratio 1.0 this equals the teacher-forced parallel call ``net(X, dec_input,
    X_valid_len)[0]`` for a decoder whose output at a step depends only on its input token and
    state (a fixed context); the chapter's ``Seq2SeqDecoder`` takes its context from the current
    state at every call, so step by step it sees the context that prediction sees
    (``predict_seq2seq``), not the training-time context of the parallel call.
    """
    ratio = _check_ratio(teacher_forcing_ratio)
    if dec_input.dim() != 2 or dec_input.shape[1] < 1:
        raise ValueError("dec_input: expected a (batch, steps) tensor with steps >= 1, got "
                         f"shape {tuple(dec_input.shape)}")
    enc_outputs = net.encoder(X, X_valid_len)
    state = net.decoder.init_state(enc_outputs, X_valid_len)
    steps = dec_input.shape[1]
    X_t = dec_input[:, :1]
    outputs = []
    for t in range(steps):
        if t > 0:
            if random.random() < ratio:
                X_t = dec_input[:, t:t + 1]
            else:
                X_t = outputs[-1].detach().argmax(dim=-1).to(dec_input.dtype)
        Y_t, state = net.decoder(X_t, state)
        outputs.append(Y_t)
    return torch.cat(outputs, 1)


class _TrainForward(nn.Module):
    """The training forward pass and the loss as one module (what DistributedDataParallel
    wraps): the teacher-forced parallel call, or :func:`decode_teacher_forced` for a ratio below
    1, then the masked loss; returns the per-sequence loss.

    With the package's GRU decoder under the extension backend only the positions the loss
    reads are computed (``kept``, see :func:`_kept_positions`): a masked position's logits are
    never read by the loss and its gradient is zero, so projecting it is wasted work (about 40%
    of the positions of a fra-eng batch of 10 steps are padding). On the CPU the decoder's GRU
    layers skip those positions too: the decoder runs the batch sorted by decreasing target
    length, packed as a ``PackedSequence`` is, with the dropout masks of the unpacked call. The
    loss and the gradients are the same (up to float rounding)."""

    def __init__(self, net, teacher_forcing_ratio, loss):
        super().__init__()
        self.net = net
        self.teacher_forcing_ratio = teacher_forcing_ratio
        self.loss = loss

    def forward(self, X, dec_input, X_valid_len, Y, Y_valid_len, kept=None):
        if self.teacher_forcing_ratio == 1.0:
            if kept is not None and _projects_kept_rows(self.net):
                return _kept_rows_loss(self.net, X, dec_input, X_valid_len, Y, kept)
            Y_hat, _ = self.net(X, dec_input, X_valid_len)
        else:
            Y_hat = decode_teacher_forced(self.net, X, dec_input, X_valid_len,
                                          self.teacher_forcing_ratio)
        return self.loss(Y_hat, Y, Y_valid_len)


def _projects_kept_rows(net):
    """True when the step may compute the loss of the kept positions only: the chapter's
    ``EncoderDecoder.forward`` and decoder layout, the usual ``__call__`` and no hook on the model
    or its decoder (the path calls neither module)."""
    decoder = getattr(net, "decoder", None)
    return (_fastcall.own_forward(net, reference.EncoderDecoder.forward)
            and isinstance(decoder, nn.Module) and _fastcall.plain_call(decoder)
            and callable(getattr(decoder, "supports_features", None))
            and decoder.supports_features()
            and type(decoder._modules.get("dense")) is nn.Linear
            and not _fastcall.has_hooks(net) and not _fastcall.has_hooks(decoder))


class _Kept(NamedTuple):
    """The positions the loss reads (see :func:`_kept_positions`)."""
    rows: torch.Tensor  # their indices among the (steps * batch) step-major positions, in the
    #                     packed layout's order when batch_sizes is given
    order: Optional[torch.Tensor] = None  # packed: the batch sorted by decreasing length
    batch_sizes: Optional[List[int]] = None  # packed: the layout's sizes, one per step


def _kept_rows(Y_valid_len, batch, steps):
    """The positions the loss reads, as indices into the (steps * batch) rows of the decoder's
    output (step-major), computed on the host from the batch as the loader gives it (no device
    synchronisation): position (b, t) is kept when t < valid_len[b], the reference's mask."""
    mask = torch.arange(steps, dtype=torch.float32)[:, None] < Y_valid_len.reshape(1, batch)
    return mask.reshape(-1).nonzero().squeeze(1)


def _kept_positions(Y_valid_len, batch, steps, packed):
    """:class:`_Kept` for a batch, on the host. ``packed``: the packed layout of the kept
    positions of the batch sorted by decreasing length (stable), for the decoder's GRU layers
    to run those only; otherwise the kept rows of the batch."""
    if Y_valid_len.numel() != batch:  # (the loss names its own valid_len so)
        raise ValueError(f"Y_valid_len: expected one length per sequence ({batch}, the rows of "
                         f"Y), got shape {tuple(Y_valid_len.shape)}")
    if not packed:
        return _Kept(_kept_rows(Y_valid_len, batch, steps))
    lengths = Y_valid_len.reshape(batch).clamp(0, steps).to(torch.int64)
    order = torch.sort(lengths, descending=True, stable=True).indices
    batch_sizes = (lengths[None, :] > torch.arange(steps)[:, None]).sum(1).tolist()
    return _Kept(models.packed_positions(batch_sizes, order), order, batch_sizes)


def _kept_rows_loss(net, X, dec_input, X_valid_len, Y, kept):
    """The per-sequence masked loss of the kept positions only (see :class:`_TrainForward`)."""
    batch, steps = Y.shape
    rows = kept.rows.to(Y.device)
    state = net.decoder.init_state(net.encoder(X, X_valid_len), X_valid_len)
    if kept.batch_sizes is not None:
        # (N, hidden): the kept positions only, in the order of rows
        kept_features, _ = net.decoder.forward_features(
            dec_input, state, batch_sizes=kept.batch_sizes, order=kept.order)
    else:
        features, _ = net.decoder.forward_features(dec_input, state)  # (steps, batch, hidden)
        kept_features = features.reshape(steps * batch, -1).index_select(0, rows)
    logits = models.project(net.decoder, kept_features)
    labels = Y.t().reshape(-1).index_select(0, rows)
    ones = torch.ones(rows.shape[0], dtype=torch.int64, device=rows.device)
    row_loss = ops.masked_softmax_ce(logits.unsqueeze(1), labels.unsqueeze(1), ones)
    row_loss = row_loss.to(torch.promote_types(row_loss.dtype, torch.float32))
    total = row_loss.new_zeros(batch).index_add(0, rows % batch, row_loss)
    return total / steps


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"teacher_forcing_ratio: expected a real number in [0, 1], got "
                        f"{type(ratio).__name__}")
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"teacher_forcing_ratio: expected a value in [0, 1], got {ratio}")
    return ratio


def _check_fit_args(net, data_iter, lr, num_epochs, tgt_vocab, device, start_epoch, optimizer,
                    amp):
    """Every argument of :func:`fit` checked before anything changes (the weights, the random
    generators); returns (device, the target vocabulary's ``<bos>`` id)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    if not hasattr(type(data_iter), "__iter__"):
        raise TypeError(f"data_iter: expected an iterable of batches, got "
                        f"{type(data_iter).__name__}")
    if optimizer is None:  # make_adam takes lr: a number, or a one-element tensor as Adam does
        real = (isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.is_complex()
                or isinstance(lr, numbers.Real) and not isinstance(lr, bool))
        if not real:
            raise TypeError(f"lr: expected a number, got {type(lr).__name__}")
        if not 0 <= float(lr) < float("inf"):
            raise ValueError(f"lr: expected a finite number >= 0, got {float(lr)}")
    try:
        bos_id = tgt_vocab['<bos>']
    except (TypeError, KeyError, IndexError, AttributeError):
        raise TypeError(f"tgt_vocab: expected the target vocabulary (a Vocab with '<bos>'), got "
                        f"{type(tgt_vocab).__name__}") from None
    device = checked_device(device)
    for name, value in (("num_epochs", num_epochs), ("start_epoch", start_epoch)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if num_epochs < 0:
        raise ValueError(f"num_epochs: expected a value >= 0, got {num_epochs}")
    if not 0 <= start_epoch <= num_epochs:
        raise ValueError(f"start_epoch: expected a value in [0, num_epochs={num_epochs}], got "
                         f"{start_epoch}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    if amp not in AMP_MODES:
        raise ValueError(f"amp: expected one of {AMP_MODES}, got {amp!r}")
    return device, bos_id


def _autocast(amp, device):
    if amp is None:
        return contextlib.nullcontext()
    enable_autocast_rules(device.type)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _distributed_world():
    """The default process group's world size; 1 when torch.distributed is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def fit(net, data_iter, lr, num_epochs, tgt_vocab, device, on_epoch=None, plot=True, *,
        optimizer=None, start_epoch=0, init_weights=True, teacher_forcing_ratio=1.0, amp=None):
    """The loop of :func:`train_seq2seq`. ``on_epoch(epoch, loss, tokens_per_sec)`` is called after
    every epoch (1-based). Returns the last epoch's (loss per token, tokens/sec).

    Keyword-only options (the defaults reproduce :func:`train_seq2seq` exactly):

    * ``optimizer``: an existing optimizer over ``net``'s parameters (then ``lr`` is not used);
      default ``make_adam(net.parameters(), lr)``.
    * ``start_epoch``: epochs already done; runs epochs ``start_epoch + 1 .. num_epochs``.
    * ``init_weights``: ``False`` skips the chapter's Xavier initialisation.

      Exact resume: capture ``torch.get_rng_state()`` (and the CUDA RNG state on a GPU),
      ``random.getstate()``, the weights and ``optimizer.state_dict()`` in ``on_epoch(k)``;
      load them into fresh objects, restore both RNG states last, and call ``fit(...,
      start_epoch=k, init_weights=False, optimizer=restored)``: on the CPU the run continues
      bitwise as if uninterrupted (the loader's shuffle, dropout masks and teacher-forcing coins
      all come from those two generators; ``fit`` draws nothing between ``on_epoch(k)`` and the
      first batch of epoch ``k + 1`` beyond what an uninterrupted run draws). A loader with its
      own ``generator`` needs that generator's state captured too.
    * ``teacher_forcing_ratio`` in [0, 1]: 1.0 trains the teacher-forced parallel forward; below
      1.0 the decoder runs step by step and feeds back its own predictions at a rate of ``1 -
      ratio`` (:func:`decode_teacher_forced`).
    * ``amp``: ``None`` or ``"bf16"``: forward and loss under ``torch.autocast(device.type,
      dtype=torch.bfloat16)``. Then the output projection (``nn.Linear``) and the decoder's
      context projection run in bfloat16 (on the CPU through ``ops.autocast_linear``, whose
      products follow ``ops.set_bf16_gemm``), the recurrent layers' products take bf16
      operands with float32 sums (on the CPU; on CUDA an autocast rule keeps the GRU layers
      float32, see :func:`enable_autocast_rules`), the loss op reads bfloat16 logits
      (accumulating in float32), and the embeddings, the layers' states, the weights, the
      gradients and the optimizer stay float32.
    * Distributed: when ``torch.distributed`` is initialised with a world size above 1, the model
      is wrapped in ``DistributedDataParallel`` after the weight initialisation (every rank
      starts from rank 0's weights), ``data_iter.sampler.set_epoch(epoch)`` is called each epoch
      when the sampler has it, the summed loss is multiplied by the world size before
      ``backward`` (DDP averages gradients, so the update equals the single-process update on
      the global batch), and the epoch's loss and token sums are all-reduced: every rank returns
      and reports the global loss and tokens/sec.
    """
    ratio = _check_ratio(teacher_forcing_ratio)
    device, bos_id = _check_fit_args(net, data_iter, lr, num_epochs, tgt_vocab, device,
                                     start_epoch, optimizer, amp)
    world = _distributed_world()
    if init_weights:
        net.apply(xavier_init_weights)
    net.to(device)
    if optimizer is None:
        optimizer = make_adam(net.parameters(), lr)
    loss = MaskedSoftmaxCELoss()
    net.train()
    model = _TrainForward(net, ratio, loss)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    animator = Animator(xlabel='epoch', ylabel='loss', xlim=[10, num_epochs]) if plot else None
    set_epoch = getattr(getattr(data_iter, "sampler", None), "set_epoch", None)
    epoch_loss, speed = float('nan'), 0.0
    try:
        for epoch in range(start_epoch, num_epochs):
            timer = Timer()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            num_tokens = torch.zeros((), dtype=torch.float64, device=device)
            if set_epoch is not None:
                set_epoch(epoch)
            for batch in data_iter:
                optimizer.zero_grad()
                kept = None
                if (ratio == 1.0 and batch[3].device.type == "cpu" and batch[3].dim() == 1
                        and not batch[3].is_floating_point()):
                    kept = _kept_positions(batch[3], *batch[2].shape, packed=device.type == "cpu")
                X, X_valid_len, Y, Y_valid_len = [x.to(device) for x in batch]
                bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype, device=device)
                dec_input = torch.cat([bos, Y[:, :-1]], 1)  # teacher forcing
                with _autocast(amp, device):
                    l = model(X, dec_input, X_valid_len, Y, Y_valid_len, kept)
                if l.dtype not in (torch.float32, torch.float64):
                    l = l.float()  # bf16 logits give a bf16 loss: sum it in float32
                if world > 1:
                    (l.sum() * world).backward()
                else:
                    l.sum().backward()
                _clip_and_step(net, 1, optimizer)
                with torch.no_grad():
                    loss_sum += l.sum()
                    num_tokens += Y_valid_len.sum()
            if world > 1:
                totals = torch.stack([loss_sum, num_tokens])
                torch.distributed.all_reduce(totals)
                loss_sum, num_tokens = totals[0], totals[1]
            tokens = num_tokens.item()
            epoch_loss = loss_sum.item() / tokens
            speed = tokens / timer.stop()
            if animator is not None and (epoch + 1) % 10 == 0:
                animator.add(epoch + 1, (epoch_loss,))
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_loss, speed)
    finally:
        if animator is not None:
            animator.flush()  # the last points, also when interrupted
        # drop the DDP wrapper now, while its process group is alive and idle: an exception's
        # traceback would otherwise keep it (with this frame) until after the group's
        # destruction, and its last reference would then tear the gloo group down from a
        # destructor holding the GIL, which a gloo worker thread waiting for it deadlocks
        model = None  # noqa: F841
    return epoch_loss, speed
