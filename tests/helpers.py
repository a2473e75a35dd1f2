"""Helpers shared by the test files (tests/ and tests/ops/): devices, the oracle's loss, random
inputs, decoders, tolerances, the decoder's reference step and greedy loop, the decode ops'
samples and bad input, spies."""
import torch

import seq2seq_ext
from seq2seq_ext import reference
from seq2seq_ext.data import Vocab
from seq2seq_ext.models import fused_decoder_args


# opcheck's checks of a backward op on inputs that require grad: all but test_aot_dispatch_dynamic,
# which differentiates the op (a backward op has no derivative of its own)
NOT_DIFFERENTIATED = ("test_schema", "test_autograd_registration", "test_faketensor")


def torch_lstm_runs_under_cpu_bf16_autocast():
    """Whether PyTorch's own CPU ``nn.LSTM`` runs under ``torch.autocast("cpu", bfloat16)``
    here: oneDNN has no bf16 LSTM primitive on some CPUs without bf16 instructions (AMD Zen 3),
    and there the reference's LSTM cannot run under autocast at all."""
    global _lstm_bf16
    if _lstm_bf16 is None:
        lstm = torch.nn.LSTM(3, 4)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                lstm(torch.zeros(2, 1, 3))
            _lstm_bf16 = True
        except RuntimeError:
            _lstm_bf16 = False
    return _lstm_bf16


_lstm_bf16 = None


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


def seeded_randint(hi, shape, seed):
    """Integers in [0, hi) of ``shape``, drawn on the CPU from a generator seeded with ``seed``."""
    return torch.randint(0, hi, shape, generator=generator(seed))


def seeded_rand(shape, seed, dtype, lo=-0.9, hi=0.9):
    """Uniform in (lo, hi) of ``shape``, drawn in float64 on the CPU and rounded to ``dtype``."""
    g = generator(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


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
    tensors), from Python or from the direct path's one call (``_fastcall.translate_ids``)."""

    def __init__(self, monkeypatch):
        from seq2seq_ext import _fastcall, models, ops
        self.op_calls = self.stepper_calls = 0
        op, bind, spy = ops.greedy_decode, models.decoder_stepper, self
        direct = _fastcall.translate_ids

        def direct_spy(*args, **kwargs):
            out = direct(*args, **kwargs)
            spy.stepper_calls += out is not None  # its stepper's greedy ran
            return out

        def op_spy(*args, **kwargs):
            spy.op_calls += 1
            return op(*args, **kwargs)

        class Bound:
            def __init__(self, stepper):
                self._stepper = stepper

            def greedy(self, *args, **kwargs):
                spy.stepper_calls += 1
                return self._stepper.greedy(*args, **kwargs)

            def __getattr__(self, name):  # every other method is the stepper's own
                return getattr(self._stepper, name)

        monkeypatch.setattr(ops, "greedy_decode", op_spy)
        monkeypatch.setattr(models, "decoder_stepper", lambda decoder: Bound(bind(decoder)))
        monkeypatch.setattr(_fastcall, "translate_ids", direct_spy)

    @property
    def calls(self):
        return self.op_calls + self.stepper_calls


class Spy:
    """``fn`` that counts its calls (``calls``), to be put in its place with monkeypatch."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# the fused GRU layer: tolerances
# ----------------------------------------------------------------------------------------------

#: The fused GRU layer against nn.GRU: float32 rtol 1e-5 / atol 1e-5 (GEMM, summation and
#: transcendental rounding differ from nn.GRU's, see tests/ops/test_gru_layer.py), float64 tight.
GRU_F32_TOL = dict(rtol=1e-5, atol=1e-5)
GRU_F64_TOL = dict(rtol=1e-10, atol=1e-12)
#: Float32 on a GPU against cuDNN's nn.GRU: rtol 1e-4 / atol 1e-4. cuDNN's backward sums the
#: gradients in its own order (up to 6e-5 apart from the package's on an H200); float64 stays
#: tight on the GPU too, which is what shows the CUDA kernels' math is nn.GRU's.
GRU_F32_CUDA_TOL = dict(rtol=1e-4, atol=1e-4)


def gru_tol(dtype, device="cpu"):
    if dtype != torch.float32:
        return GRU_F64_TOL
    return GRU_F32_CUDA_TOL if torch.device(device).type == "cuda" else GRU_F32_TOL


def assert_close_dict(got, want, tol, what=""):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol,
                                   msg=lambda m, n=name: f"{what}{n}: {m}")


# ----------------------------------------------------------------------------------------------
# decoding: the reference decoder's step and greedy loop
# ----------------------------------------------------------------------------------------------

def decode_tol(dtype, device="cpu"):
    """Tolerances of the decode ops against nn.GRU / nn.LSTM and nn.Linear: the kernels'
    products (dot products or one GEMM) sum in another order than their GEMMs, rtol 1e-5 and
    atol 1e-5 in float32 (on a GPU against cuDNN, the suite's float32 GPU rule,
    GRU_F32_CUDA_TOL); float64 at assert_close's defaults."""
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return dict(GRU_F32_CUDA_TOL)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


def reference_step(ref, token, state):
    """One step of the chapter's decoder: logits (B, V) and the new state. The state goes to
    nn.GRU contiguous (cuDNN refuses another layout); the op under test takes it as it is."""
    with torch.no_grad():
        Y, new_state = ref(token.reshape(-1, 1).long(), state.contiguous())
    return Y[:, 0], new_state


def fixed_context_step(decoder, token, state, context):
    """One decoder step whose concatenated context is ``context`` (B, H) instead of
    state[-1]: embedding, cat, one nn.GRU step, dense."""
    with torch.no_grad():
        emb = decoder.embedding(token.reshape(-1).long())
        x = torch.cat((emb, context), dim=1)[None]
        out, new_state = decoder.rnn(x, state.contiguous())
        return decoder.dense(out[0]), new_state


def ctx_projection(decoder, context):
    w_ih0 = decoder.rnn.weight_ih_l0
    return (context @ w_ih0[:, decoder.embedding.embedding_dim:].t()).detach()


def decoder_setup(config, device, seed):
    vocab, embed, hidden, layers, batch, dtype = config
    dec = make_decoder(vocab, embed, hidden, layers, dtype=dtype, device=device, seed=seed)
    state = random_state(layers, batch, hidden, dtype=dtype, device=device, seed=seed)
    return dec, reference_decoder(dec), state


def reference_greedy(ref, state, bos, eos, num_steps, context=None):
    """predict_seq2seq's loop, one sentence at a time (batch 1, one .item() per token)."""
    tokens, lengths = [], []
    for b in range(state.shape[1]):
        s = state[:, b:b + 1]
        x = torch.tensor([[bos]], device=state.device)
        out = []
        for _ in range(num_steps):
            if context is None:
                Y, s = reference_step(ref, x, s)
            else:
                Y, s = fixed_context_step(ref, x, s, context[b:b + 1])
            x = Y.argmax(dim=1, keepdim=True)
            pred = x.squeeze().type(torch.int32).item()
            if pred == eos:
                break
            out.append(pred)
        lengths.append(len(out))
        tokens.append(out + [eos] * (num_steps - len(out)))
    return tokens, lengths


def free_run(ref, state, bos, num_steps, context=None):
    """The greedy tokens (B, num_steps) without stopping, the whole batch at once."""
    x = torch.full((state.shape[1],), bos, device=state.device)
    s, out = state, []
    for _ in range(num_steps):
        if context is None:
            Y, s = reference_step(ref, x, s)
        else:
            Y, s = fixed_context_step(ref, x, s, context)
        x = Y.argmax(dim=1)
        out.append(x)
    return torch.stack(out, dim=1).tolist()


def pick_eos(free, vocab, num_steps):
    """The token whose first occurrences spread the sentences' stopping points the most."""
    def score(v):
        stops = [row.index(v) if v in row else num_steps for row in free]
        return (len(set(stops)), sum(s < num_steps for s in stops))
    return max(range(vocab), key=score)


# ----------------------------------------------------------------------------------------------
# the decode ops (gru_decode_step, greedy_decode): samples and bad input
# ----------------------------------------------------------------------------------------------

def decode_samples(device):
    """(decoder, state, context or None, token) samples."""
    out = []
    for i, (config, with_ctx) in enumerate([((13, 5, 7, 1, 4, torch.float32), False),
                                            ((17, 4, 6, 2, 3, torch.float64), True),
                                            ((11, 3, 5, 3, 1, torch.float32), True),
                                            ((9, 2, 4, 2, 5, torch.float64), False)]):
        dec, _, state = decoder_setup(config, device, seed=60 + i)
        context = (random_state(1, config[4], config[2], dtype=config[5], device=device,
                                seed=70 + i)[0] if with_ctx else None)
        token = random_tokens(config[4], config[0], device=device, seed=60 + i)
        out.append((dec, state, context, token))
    return out


def decode_base_args(device):
    dec, _, state = decoder_setup((15, 5, 8, 2, 3, torch.float32), device, seed=80)
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    weights = [w.detach() for w in weights]
    token = random_tokens(3, 15, device=device, seed=80)
    ctx = ctx_projection(dec, random_state(1, 3, 8, device=device, seed=81)[0])
    return dict(token=token, state=state, emb_proj=emb_proj, ctx_proj=ctx, weights=weights,
                dense_weight=dw.detach(), dense_bias=db.detach())


def decode_bad_cases(a, device):
    """(argument named in the message, replacements) for both decode ops."""
    w = a["weights"]
    return [
        ("weights", dict(weights=w[:4])),
        ("weights", dict(weights=w + w[:4])),
        ("weights", dict(weights=w[:-1])),
        ("weights", dict(weights=[w[0], w[1][:, :5]] + w[2:])),
        ("weights", dict(weights=[w[0], w[1], w[2][:-1]] + w[3:])),
        ("weights", dict(weights=[w[0][:, :3]] + w[1:])),
        ("weights", dict(weights=[w[0].double()] + w[1:])),
        ("weights", dict(weights=w[:7] + [w[7][None]])),
        ("state", dict(state=a["state"][0])),
        ("state", dict(state=a["state"][None])),
        ("state", dict(state=a["state"].half())),
        ("state", dict(state=a["state"].to(torch.int64))),
        ("weights", dict(state=a["state"][:1])),  # two layers' weights for a 1-layer state
        ("emb_proj", dict(emb_proj=a["emb_proj"][:, :-1])),
        ("emb_proj", dict(emb_proj=a["emb_proj"].double())),
        ("emb_proj", dict(emb_proj=a["emb_proj"][0])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:2])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:, :-1])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][None])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"].double())),
        ("dense_weight", dict(dense_weight=a["dense_weight"][:, :-1])),
        ("dense_weight", dict(dense_weight=a["dense_weight"].double())),
        ("dense_bias", dict(dense_bias=a["dense_bias"][:-1])),
        ("dense_bias", dict(dense_bias=a["dense_bias"][None])),
        ("dense_bias", dict(dense_bias=a["dense_bias"].double())),
    ]


def snapshot(args):
    out = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            out.append(v.clone())
        elif isinstance(v, list):
            out.append([t.clone() for t in v])
        else:
            out.append(v)
    return out


def assert_unchanged(args, snap):
    for v, s in zip(args.values(), snap):
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s)
        elif isinstance(v, list):
            assert all(torch.equal(t, u) for t, u in zip(v, s))


# the chapter's example words: small vocabularies for the decoding tests
SRC_WORDS = ["go", ".", "i", "lost", "he's", "calm", "i'm", "home", "run", "!", "who", "?",
             "wow", "fire", "help", "stop", "wait", "hello", "hi", "we", "try"]
TGT_WORDS = ["va", "!", "j'ai", "perdu", ".", "il", "est", "riche", "je", "suis", "en",
             "retard", "?", "cours", "qui", "ça", "alors", "au", "feu", "aide", "arrête"]


def toy_vocabs():
    """(src_vocab, tgt_vocab) of SRC_WORDS / TGT_WORDS with d2l's reserved tokens."""
    src = Vocab([SRC_WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    tgt = Vocab([TGT_WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    return src, tgt


def assert_bf16_close(got, want):
    """Values through bf16 products (outputs or gradients). Each product rounds computed values
    (the state, the gates' gradients) to bf16, so where two float32 sums differ in their last bit
    a rounding can land one bf16 step apart and move a few elements by ~1e-3 relative. Most
    elements agree to float32's precision and the whole to well within bf16's; float32 products
    do neither (about all of their elements differ: tests/ops/test_rnn_stack.py,
    test_float32_products_are_not_what_it_computes)."""
    got = got.float()
    off = (got - want).abs() > 1e-5 + 1e-4 * want.abs()
    assert off.float().mean().item() <= 0.2, f"{off.sum().item()} of {off.numel()} elements off"
    assert (got - want).norm() <= 1e-2 * want.norm() + 1e-6
