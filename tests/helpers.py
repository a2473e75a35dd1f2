"""Helpers shared by the op test files: devices, the oracle's loss, random inputs, decoders."""
import torch

import seq2seq_ext
from seq2seq_ext import reference


def devices():
    """The devices the op tests run on: the CPU, and CUDA when a GPU is present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def generator(seed):
    """A CPU generator seeded with ``seed`` (random data is drawn on the CPU, then moved)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def reference_ce(pred, label, valid_len):
    """The oracle's per-sequence masked loss: ``reference.MaskedSoftmaxCELoss()``.
    nn.CrossEntropyLoss takes int64 class indices only, so the labels are widened for it."""
    return reference.MaskedSoftmaxCELoss()(pred, label.long(), valid_len)


def random_logits(batch, steps, vocab, *, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    """Logits (batch, steps, vocab) ~ N(0, scale^2), drawn in float64 and rounded to dtype."""
    g = generator(seed)
    x = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype)


def random_labels(batch, steps, vocab, *, dtype=torch.int64, device="cpu", seed=0):
    g = generator(seed + 1)
    return torch.randint(0, vocab, (batch, steps), generator=g).to(device=device, dtype=dtype)


def random_valid_len(batch, steps, *, device="cpu", seed=0, dtype=torch.int64):
    """Lengths in [0, steps + 2]: some sequences fully masked, some longer than ``steps``."""
    g = generator(seed + 2)
    vl = torch.randint(0, steps + 3, (batch,), generator=g)
    return vl.to(device=device, dtype=dtype)


def random_ce_inputs(batch, steps, vocab, *, dtype=torch.float32, device="cpu", seed=0,
                     label_dtype=torch.int64):
    """(pred, label, valid_len) for the masked softmax cross-entropy."""
    return (random_logits(batch, steps, vocab, dtype=dtype, device=device, seed=seed),
            random_labels(batch, steps, vocab, dtype=label_dtype, device=device, seed=seed),
            random_valid_len(batch, steps, device=device, seed=seed))


def make_decoder(vocab, embed, hidden, layers, *, dtype=torch.float32, device="cpu", seed=0,
                 cls=None, dense_scale=1.0):
    """A ``Seq2SeqDecoder`` (the package's by default) with seeded random weights, in eval mode.
    ``dense_scale`` multiplies the output projection, to spread the logits."""
    cls = seq2seq_ext.Seq2SeqDecoder if cls is None else cls
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        dec = cls(vocab, embed, hidden, layers)
        with torch.no_grad():
            for p in dec.rnn.parameters():
                p.uniform_(-0.6, 0.6)
            dec.dense.weight.mul_(dense_scale)
            dec.dense.bias.mul_(dense_scale)
    return dec.to(device=device, dtype=dtype).eval()


def reference_copy(module, cls, *args):
    """A ``cls(*args)`` of the reference with ``module``'s weights (dtype and device included)."""
    p = next(module.parameters())
    ref = cls(*args).to(device=p.device, dtype=p.dtype)
    ref.load_state_dict(module.state_dict())
    return ref.eval()


def reference_decoder(decoder):
    """A ``reference.Seq2SeqDecoder`` with the same weights as ``decoder``."""
    return reference_copy(decoder, reference.Seq2SeqDecoder, decoder.embedding.num_embeddings,
                          decoder.embedding.embedding_dim, decoder.rnn.hidden_size,
                          decoder.rnn.num_layers)


def random_state(layers, batch, hidden, *, dtype=torch.float32, device="cpu", seed=0):
    """A decoder state (layers, batch, hidden) in (-0.9, 0.9), like a GRU's hidden state."""
    g = generator(seed + 3)
    s = torch.rand(layers, batch, hidden, generator=g, dtype=torch.float64) * 1.8 - 0.9
    return s.to(device=device, dtype=dtype)


def random_tokens(batch, vocab, *, device="cpu", seed=0, dtype=torch.int64):
    g = generator(seed + 4)
    return torch.randint(0, vocab, (batch,), generator=g).to(device=device, dtype=dtype)


class GreedySpy:
    """Counts the fused greedy decodes of predict_seq2seq and predict_seq2seq_batch: calls of
    ``ops.greedy_decode`` and of a bound stepper's ``greedy`` (their path for plain CPU
    tensors)."""

    def __init__(self, monkeypatch):
        from seq2seq_ext import decoding, ops
        self.op_calls = self.stepper_calls = 0
        op, bind, spy = ops.greedy_decode, decoding.decoder_stepper, self

        def op_spy(*args, **kwargs):
            spy.op_calls += 1
            return op(*args, **kwargs)

        class Bound:
            def __init__(self, stepper):
                self._stepper = stepper

            def greedy(self, *args, **kwargs):
                spy.stepper_calls += 1
                return self._stepper.greedy(*args, **kwargs)

        monkeypatch.setattr(ops, "greedy_decode", op_spy)
        monkeypatch.setattr(decoding, "decoder_stepper", lambda decoder: Bound(bind(decoder)))

    @property
    def calls(self):
        return self.op_calls + self.stepper_calls
