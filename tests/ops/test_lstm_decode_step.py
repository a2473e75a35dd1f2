"""The LSTM decoder's inference step: ``ops.lstm_decode_step`` /
``torch.ops.seq2seq_ext.lstm_decode_step`` against ``nn.LSTM`` (random odd sizes,
float32/float64, batch 1, vocab 1, 1..3 layers; the chapter's context rule and a fixed
context), the direct CPU call of the bound stepper, ``opcheck``, bad input."""
import re

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import models, ops
from seq2seq_ext.models import context_projection, fused_decoder_args

from helpers import decode_tol, devices, seeded_rand, seeded_randint

LSTM_STEP = torch.ops.seq2seq_ext.lstm_decode_step
DEVICES = devices()


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# lstm_decode_step against nn.LSTM
# ----------------------------------------------------------------------------------------------

# (tgt_vocab, embed, hidden, layers, batch, dtype); the last ones are large enough for the CPU
# kernel's BLAS path, the others take its dot-product path.
CONFIGS = [
    (13, 5, 7, 1, 4, torch.float32),
    (29, 8, 16, 2, 3, torch.float64),
    (11, 3, 9, 3, 1, torch.float32),
    (1, 4, 5, 2, 3, torch.float64),
    (1, 2, 3, 1, 1, torch.float32),
    (37, 6, 33, 2, 5, torch.float32),
    (41, 16, 64, 3, 17, torch.float64),
    (300, 16, 64, 2, 9, torch.float32),
]
CONFIG_IDS = [f"V{v}-E{e}-H{h}-L{l}-B{b}-{str(d)[6:]}" for v, e, h, l, b, d in CONFIGS]


def _lstm_decoder(vocab, embed, hidden, layers, dtype, device, seed):
    """A package LSTM decoder with seeded weights spread wider than the default init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = seq2seq_ext.Seq2SeqDecoder(vocab, embed, hidden, layers, cell="lstm")
        with torch.no_grad():
            for p in dec.rnn.parameters():
                p.uniform_(-0.6, 0.6)
    return dec.to(device=device, dtype=dtype).eval()


def _nn_lstm_step(dec, token, h, c, context):
    """One step with nn.LSTM: embedding, cat with the context, nn.LSTM, dense. The states go
    to nn.LSTM contiguous (cuDNN refuses another layout)."""
    with torch.no_grad():
        x = torch.cat((dec.embedding(token.reshape(-1).long()), context), dim=1)[None]
        out, (h2, c2) = dec.rnn(x, (h.contiguous(), c.contiguous()))
        return dec.dense(out[0]), h2, c2


def _step_setup(config, device, seed):
    vocab, embed, hidden, layers, batch, dtype = config
    dec = _lstm_decoder(vocab, embed, hidden, layers, dtype, device, seed)
    h = seeded_rand((layers, batch, hidden), seed + 1, dtype).to(device)
    c = seeded_rand((layers, batch, hidden), seed + 2, dtype, -2.0, 2.0).to(device)
    token = seeded_randint(vocab, (batch,), seed + 3).to(device)
    return dec, h, c, token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_lstm_step_matches_nn_lstm(device, config):
    dec, h, c, token = _step_setup(config, device, seed=10)
    vocab, hidden, batch, dtype = config[0], config[2], config[4], config[5]
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    h0, c0 = h.clone(), c.clone()
    # the chapter's context rule: h[-1]
    logits, h2, c2 = LSTM_STEP(token, h, c, emb_proj, None, weights, dw, db)
    ref_logits, ref_h, ref_c = _nn_lstm_step(dec, token, h, c, h[-1])
    assert logits.shape == (batch, vocab) and logits.dtype == dtype
    assert h2.shape == h.shape and c2.shape == c.shape
    torch.testing.assert_close(logits, ref_logits, **decode_tol(dtype, device))
    torch.testing.assert_close(h2, ref_h, **decode_tol(dtype, device))
    torch.testing.assert_close(c2, ref_c, **decode_tol(dtype, device))
    assert torch.equal(h, h0) and torch.equal(c, c0)
    # a fixed context through ctx_proj
    context = seeded_rand((batch, hidden), 77, dtype).to(device)
    ctx_proj = context_projection(dec, context)
    logits_f, hf, cf = LSTM_STEP(token, h, c, emb_proj, ctx_proj, weights, dw, db)
    ref_logits_f, ref_hf, ref_cf = _nn_lstm_step(dec, token, h, c, context)
    torch.testing.assert_close(logits_f, ref_logits_f, **decode_tol(dtype, device))
    torch.testing.assert_close(hf, ref_hf, **decode_tol(dtype, device))
    torch.testing.assert_close(cf, ref_cf, **decode_tol(dtype, device))
    # (B, 1) ids give (B, 1, V) logits, int32 ids the same numbers
    logits1, h1, c1 = ops.lstm_decode_step(token[:, None], h, c, emb_proj, None, weights, dw, db)
    assert logits1.shape == (batch, 1, vocab)
    assert torch.equal(logits1[:, 0], logits) and torch.equal(h1, h2) and torch.equal(c1, c2)
    logits32, _, _ = LSTM_STEP(token.int(), h, c, emb_proj, None, weights, dw, db)
    assert torch.equal(logits32, logits)
    # the plain PyTorch step of the reference backend
    with seq2seq_ext.use_backend("reference"):
        r_logits, r_h, r_c = ops.lstm_decode_step(token, h, c, emb_proj, ctx_proj, weights, dw,
                                                  db)
    torch.testing.assert_close(r_logits, logits_f, **decode_tol(dtype, device))
    torch.testing.assert_close(r_h, hf, **decode_tol(dtype, device))
    torch.testing.assert_close(r_c, cf, **decode_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_step_several_steps_and_strided_inputs(device):
    dec, _, _, _ = _step_setup((17, 6, 11, 2, 5, torch.float64), device, seed=20)
    # (B, L, H) storage transposed: non-contiguous states; every other token
    h = seeded_rand((5, 2, 11), 21, torch.float64).to(device).transpose(0, 1)
    c = seeded_rand((5, 2, 11), 22, torch.float64, -2, 2).to(device).transpose(0, 1)
    tok = seeded_randint(17, (10,), 23).to(device)[::2]
    assert not h.is_contiguous() and not tok.is_contiguous()
    s_ext, s_ref = (h, c), (h, c)
    args = fused_decoder_args(dec)
    for _ in range(5):
        logits, h2, c2 = ops.lstm_decode_step(tok, *s_ext, *args)
        ref_logits, rh, rc = _nn_lstm_step(dec, tok, *s_ref, s_ref[0][-1])
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(h2, rh)
        torch.testing.assert_close(c2, rc)
        s_ext, s_ref = (h2, c2), (rh, rc)
        tok = ref_logits.argmax(dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_step_with_parameters_requiring_grad(device):
    dec, h, c, token = _step_setup((15, 5, 8, 2, 3, torch.float32), device, seed=30)
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    assert weights[0].requires_grad and dw.requires_grad
    logits, h2, c2 = ops.lstm_decode_step(token, h.requires_grad_(), c, emb_proj, None, weights,
                                          dw, db)
    assert not (logits.requires_grad or h2.requires_grad or c2.requires_grad)
    ref_logits, _, _ = _nn_lstm_step(dec, token, h.detach(), c, h.detach()[-1])
    torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32, device))


def test_lstm_step_direct_cpu_call_equals_the_op():
    dec, h, c, token = _step_setup((23, 6, 10, 2, 4, torch.float32), "cpu", seed=35)
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    stepper = models.decoder_stepper(dec)
    ctx_proj = context_projection(dec, h[0])
    for ctx in (None, ctx_proj):
        want = LSTM_STEP(token[:, None], h, c, emb_proj, ctx, weights, dw, db)
        got = stepper.lstm_step(token[:, None], h, c, ctx)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------------------------
# opcheck and bad input
# ----------------------------------------------------------------------------------------------

def _samples(device):
    out = []
    for i, (config, with_ctx) in enumerate([((13, 5, 7, 1, 4, torch.float32), False),
                                            ((17, 4, 6, 2, 3, torch.float64), True),
                                            ((11, 3, 5, 3, 1, torch.float32), True),
                                            ((1, 2, 4, 2, 5, torch.float64), False)]):
        dec, h, c, token = _step_setup(config, device, seed=40 + 5 * i)
        context = seeded_rand((config[4], config[2]), 90 + i, config[5]).to(device)
        ctx = context_projection(dec, context) if with_ctx else None
        out.append((dec, h, c, token, ctx))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_lstm_decode_step(device):
    for i, (dec, h, c, token, ctx) in enumerate(_samples(device)):
        emb_proj, _, weights, dw, db = fused_decoder_args(dec)
        if i % 2:
            token = token[:, None]
        if i == 0:  # the decoder's parameters as they come: requiring grad
            weights = list(weights)
        else:
            weights, dw, db = [w.detach() for w in weights], dw.detach(), db.detach()
        torch.library.opcheck(LSTM_STEP, (token, h, c, emb_proj, ctx, weights, dw, db))


def _bad_base(device):
    dec, h, c, token = _step_setup((15, 5, 8, 2, 3, torch.float32), device, seed=50)
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    ctx = context_projection(dec, seeded_rand((3, 8), 51, torch.float32).to(device))
    return dict(token=token, h=h, c=c, emb_proj=emb_proj.clone(), ctx_proj=ctx.clone(),
                weights=[w.detach().clone() for w in weights], dense_weight=dw.detach().clone(),
                dense_bias=db.detach().clone())


def test_opcheck_of_an_empty_batch():
    a = _bad_base("cpu")
    torch.library.opcheck(LSTM_STEP, (a["token"][:0], a["h"][:, :0], a["c"][:, :0],
                                      a["emb_proj"], a["ctx_proj"][:0], a["weights"],
                                      a["dense_weight"], a["dense_bias"]))


def test_lstm_step_of_an_empty_batch_under_either_backend():
    a = _bad_base("cpu")
    a.update(token=a["token"][:0], h=a["h"][:, :0], c=a["c"][:, :0], ctx_proj=a["ctx_proj"][:0])
    shapes = []
    for backend in ("ext", "reference"):
        with seq2seq_ext.use_backend(backend):
            shapes.append([t.shape for t in ops.lstm_decode_step(**a)])
    assert shapes[0] == shapes[1] and shapes[0][0] == (0, 15)


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_step_bad_input_names_argument(device):
    a = _bad_base(device)
    w, h, c, tok = a["weights"], a["h"], a["c"], a["token"]
    gru_like = seq2seq_ext.Seq2SeqDecoder(15, 5, 8, 2).to(device)  # 3 gates, not 4
    # token values are checked on the host on the CPU only: a CUDA kernel stops with a
    # device-side assertion (test_cuda_graphs.py checks it in a process of its own)
    cases = [
        ("token", dict(token=torch.tensor([0, 15, 1], device=device))),   # out of range
        ("token", dict(token=torch.tensor([0, 1, -1], device=device))),
    ] if device == "cpu" else []
    cases += [
        ("h", dict(h=h[0])),                          # wrong rank
        ("h", dict(h=h[None])),
        ("h", dict(h=h.half())),
        ("h", dict(h=h.to(torch.int64))),
        ("c", dict(c=c[0])),
        ("c", dict(c=c[:, :2])),                      # mismatched batch
        ("c", dict(c=c.double())),
        ("token", dict(token=tok[:2])),               # mismatched batch
        ("token", dict(token=tok[None])),             # wrong rank
        ("token", dict(token=tok[:, None].repeat(1, 2))),
        ("token", dict(token=tok.float())),
        ("weights", dict(weights=w[:4])),
        ("weights", dict(weights=w[:-1])),
        ("weights", dict(weights=[w[0][:, :3]] + w[1:])),
        ("weights", dict(weights=[w[0].double()] + w[1:])),
        ("weights", dict(weights=[t.detach() for t in gru_like.rnn._flat_weights])),
        ("weights", dict(h=h[:1], c=c[:1])),          # two layers' weights for a 1-layer state
        ("emb_proj", dict(emb_proj=a["emb_proj"][:, :-1])),
        ("emb_proj", dict(emb_proj=a["emb_proj"][0])),
        ("emb_proj", dict(emb_proj=a["emb_proj"].double())),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:2])),   # mismatched batch
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:, :-1])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][None])),
        ("dense_weight", dict(dense_weight=a["dense_weight"][:, :-1])),
        ("dense_bias", dict(dense_bias=a["dense_bias"][:-1])),
        ("dense_bias", dict(dense_bias=a["dense_bias"].double())),
    ]
    if device != "cpu":
        cases.append(("token", dict(token=tok.cpu())))
        cases.append(("c", dict(c=c.cpu())))
    for name, change in cases:
        args = {**a, **change}
        snap = {k: ([t.clone() for t in v] if isinstance(v, list) else v.clone())
                for k, v in args.items()}
        with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
            LSTM_STEP(**args)
        for k, v in args.items():  # nothing was written
            if isinstance(v, list):
                assert all(torch.equal(x, y) for x, y in zip(v, snap[k])), k
            else:
                assert torch.equal(v, snap[k]), k
