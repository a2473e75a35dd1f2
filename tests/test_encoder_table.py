"""The GRU encoder's table of layer 0's input projections in CPU inference
(``models.encoder_table``; its steps run by ``ops.gru_over_projection`` and the direct entry
``_C.gru_layer_projected_cpu``): the encoder's results with and without it against the
reference's, when it is made and dropped, and the entry's checks."""
import copy
import pickle

import pytest
import torch

from seq2seq_ext import _C, models, ops, reference

from helpers import generator, gru_tol, reference_copy, seeded_randint

TABLE_ATTR = models._TABLE_ATTR


def make_encoder(vocab, embed, hidden, layers, *, seed, dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = models.Seq2SeqEncoder(vocab, embed, hidden, layers)
    return enc.to(dtype).eval()


def reference_encoder(enc):
    return reference_copy(enc, reference.Seq2SeqEncoder, enc.embedding.num_embeddings,
                          enc.embedding.embedding_dim, enc.rnn.hidden_size, enc.rnn.num_layers)


def assert_same_encoding(got, want, dtype):
    tol = gru_tol(dtype)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


def has_table(enc):
    cached = enc.__dict__.get(TABLE_ATTR)
    return cached is not None and cached[1] is not None


# (vocab, embed, hidden, layers, batch, steps): sizes that are no multiple of the vector width,
# one sentence and a batch, one step and several
CONFIGS = [(37, 7, 13, 1, 1, 9), (23, 6, 12, 3, 5, 4), (301, 16, 40, 2, 1, 1), (50, 9, 33, 2, 7, 11)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=[f"V{c[0]}-E{c[1]}-H{c[2]}-L{c[3]}-B{c[4]}-T{c[5]}"
                                                 for c in CONFIGS])
def test_the_reference_encoders_results(config, dtype):
    vocab, embed, hidden, layers, batch, steps = config
    enc = make_encoder(vocab, embed, hidden, layers, seed=hidden, dtype=dtype)
    ref = reference_encoder(enc)
    X = seeded_randint(vocab, (batch, steps), seed=steps)
    with torch.no_grad():
        want = ref(X)
        assert not has_table(enc)
        first = enc(X)
        assert has_table(enc)
        second = enc(X)
        third = enc(seeded_randint(vocab, (batch, steps), seed=steps + 1))
    with torch.enable_grad():
        grad_mode = enc(X)  # the op with its graph: no table
    assert_same_encoding(first, want, dtype)
    assert_same_encoding(grad_mode, want, dtype)
    assert first[0].equal(second[0]) and first[1].equal(second[1])  # the same, bit for bit
    with torch.no_grad():
        assert_same_encoding(third, ref(seeded_randint(vocab, (batch, steps), seed=steps + 1)),
                             dtype)
    assert second[0].shape == (steps, batch, hidden) and second[1].shape == (layers, batch, hidden)


@pytest.mark.parametrize("name", ["embedding.weight", "rnn.weight_ih_l0", "rnn.bias_ih_l0"])
def test_follows_in_place_updates(name):
    enc = make_encoder(41, 8, 16, 2, seed=3)
    X = seeded_randint(41, (3, 6), seed=4)
    with torch.no_grad():
        before = enc(X)
        table = enc.__dict__[TABLE_ATTR][1]
        enc.get_parameter(name).add_(torch.randn(enc.get_parameter(name).shape,
                                                 generator=generator(5)))
        after = enc(X)
        want = reference_encoder(enc)(X)
    assert_same_encoding(after, want, torch.float32)
    assert enc.__dict__[TABLE_ATTR][1] is not table
    assert not torch.allclose(before[1], after[1])


def test_follows_new_modules_and_storages_at_reused_addresses():
    """The table is kept for the same tensors only: a new embedding module (a new Parameter,
    whose id and address may be a freed one's, with the same version) or storage swapped in
    through ``.data`` (which keeps the version) is never taken for the old one. Many rounds,
    each replacing several times, so that the allocator hands back freed addresses."""
    from torch import nn
    enc = make_encoder(41, 8, 16, 2, seed=3)
    X = seeded_randint(41, (3, 6), seed=4)
    torch.manual_seed(6)
    for round in range(120):
        for _ in range(1 + round % 4):
            if round % 2:
                enc.embedding = nn.Embedding(41, 8)
            else:
                enc.rnn.weight_ih_l0.data = torch.randn_like(enc.rnn.weight_ih_l0)
        with torch.no_grad():
            got = enc.eval()(X)  # inference: the table
        want = enc(X)            # grad mode: no table
        torch.testing.assert_close(got[1], want[1].detach(), **gru_tol(torch.float32))


def test_follows_a_transposed_view_of_the_same_storage():
    """``.data = w.data.t()`` on a square matrix keeps its storage, shape and version: the
    table follows the strides too (the next inference call equals the graph-mode one)."""
    enc = make_encoder(8, 8, 16, 2, seed=3)  # an 8 x 8 embedding
    X = seeded_randint(8, (3, 6), seed=4)
    with torch.no_grad():
        enc.eval()(X)  # the table, made
        enc.embedding.weight.data = enc.embedding.weight.data.t()
        got = enc(X)
    want = enc(X)  # grad mode: no table
    torch.testing.assert_close(got[1], want[1].detach(), **gru_tol(torch.float32))


def test_only_in_inference():
    enc = make_encoder(41, 8, 16, 2, seed=3)
    X = seeded_randint(41, (3, 6), seed=4)
    with torch.no_grad():
        assert models.encoder_table(enc, X) is not None
    # grad mode: the op with its graph
    assert models.encoder_table(enc, X) is None
    out, state = enc(X)
    assert state.requires_grad
    with torch.no_grad():
        assert models.encoder_table(enc, X.int()) is None  # other index dtypes: nn.Embedding
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert models.encoder_table(enc, X) is None
        enc.train()
        assert models.encoder_table(enc, X) is None
        enc.eval()
        with ops.use_backend("reference"):
            assert models.encoder_table(enc, X) is None
        seen = []
        handle = enc.embedding.register_forward_hook(lambda *a: seen.append(1))
        assert models.encoder_table(enc, X) is None
        enc(X)
        handle.remove()
        assert seen == [1]  # the hook ran: the embedding was called
        assert models.encoder_table(enc, X) is not None


def test_no_table_beyond_its_size_limit(monkeypatch):
    enc = make_encoder(41, 8, 16, 2, seed=3)
    X = seeded_randint(41, (3, 6), seed=4)
    monkeypatch.setattr(models, "_TABLE_MAX_BYTES", 41 * 48 * 4 - 1)
    with torch.no_grad():
        enc(X)
        assert models.encoder_table(enc, X) is None and not has_table(enc)
    monkeypatch.setattr(models, "_TABLE_MAX_BYTES", 41 * 48 * 4)
    with torch.no_grad():
        assert models.encoder_table(enc, X) is not None


def test_dropped_by_copies_and_dtype_changes():
    enc = make_encoder(41, 8, 16, 2, seed=3)
    X = seeded_randint(41, (3, 6), seed=4)
    with torch.no_grad():
        enc(X)
    assert has_table(enc)
    assert TABLE_ATTR not in copy.deepcopy(enc).__dict__
    assert TABLE_ATTR not in pickle.loads(pickle.dumps(enc)).__dict__
    enc.double()
    assert TABLE_ATTR not in enc.__dict__
    with torch.no_grad():
        got = enc(X)
        want = reference_encoder(enc)(X)
    assert has_table(enc) and got[0].dtype == torch.float64
    assert_same_encoding(got, want, torch.float64)


class TestGruLayerProjectedCpu:
    """The direct entry: gru_layer's steps over a given input projection."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("steps,batch,inp,hidden", [(1, 1, 3, 5), (7, 4, 9, 17), (3, 2, 4, 1)])
    def test_equals_gru_layer(self, steps, batch, inp, hidden, dtype):
        g = generator(steps * 100 + hidden)
        x, h0 = (torch.randn(steps, batch, inp, generator=g, dtype=dtype),
                 torch.randn(batch, hidden, generator=g, dtype=dtype))
        w_ih, w_hh = (torch.randn(3 * hidden, n, generator=g, dtype=dtype) for n in (inp, hidden))
        b_ih, b_hh = (torch.randn(3 * hidden, generator=g, dtype=dtype) for _ in range(2))
        gi = torch.addmm(b_ih, x.reshape(-1, inp), w_ih.t()).reshape(steps, batch, -1)
        out, h_n = _C.gru_layer_projected_cpu(gi, h0, w_hh, b_hh)
        want_out, want_h, _ = _C.gru_layer_cpu(x, h0, w_ih, w_hh, b_ih, b_hh)
        torch.testing.assert_close(out, want_out, **gru_tol(dtype))
        torch.testing.assert_close(h_n, want_h, **gru_tol(dtype))

    def test_no_steps(self):
        h0 = torch.randn(2, 5)
        out, h_n = _C.gru_layer_projected_cpu(torch.zeros(0, 2, 15), h0, torch.zeros(15, 5),
                                              torch.zeros(15))
        assert out.shape == (0, 2, 5) and torch.equal(h_n, h0)

    def test_bad_input_names_the_argument(self):
        gi, h0, w_hh, b_hh = torch.zeros(4, 2, 15), torch.zeros(2, 5), torch.zeros(15, 5), \
            torch.zeros(15)
        cases = [((gi[0], h0, w_hh, b_hh), "gi"),
                 ((gi.int(), h0, w_hh, b_hh), "gi"),
                 ((gi, h0.double(), w_hh, b_hh), "h0"),
                 ((gi, h0, w_hh.double(), b_hh), "w_hh"),
                 ((gi, h0, torch.zeros(12, 4), b_hh), "gi"),
                 ((gi, h0, torch.zeros(14, 5), b_hh), "w_hh"),
                 ((gi, h0, w_hh, torch.zeros(12)), "b_hh"),
                 ((gi, torch.zeros(3, 5), w_hh, b_hh), "h0")]
        for args, name in cases:
            snap = [a.clone() for a in args]
            with pytest.raises(RuntimeError, match=rf"^{name}\b"):
                _C.gru_layer_projected_cpu(*args)
            assert all(torch.equal(a, s) for a, s in zip(args, snap))

    @pytest.mark.parametrize("steps,batch,hidden", [(1, 1, 5), (6, 3, 40)])
    def test_bf16_weights_beside_a_float32_state(self, steps, batch, hidden):
        """A bfloat16 W_hh is read as it is: the float32 layer over its values, to float32
        rounding (the state itself is not rounded)."""
        g = generator(steps + hidden)
        gi, h0 = torch.randn(steps, batch, 3 * hidden, generator=g), torch.randn(batch, hidden,
                                                                              generator=g)
        w_hh, b_hh = torch.randn(3 * hidden, hidden, generator=g), torch.randn(3 * hidden,
                                                                             generator=g)
        low = w_hh.bfloat16()
        got = _C.gru_layer_projected_cpu(gi, h0, low, b_hh)
        want = _C.gru_layer_projected_cpu(gi, h0, low.float(), b_hh)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **gru_tol(torch.float32))
        rounded_state = _C.gru_layer_projected_cpu(gi, h0.bfloat16().float(), low.float(), b_hh)
        assert not torch.allclose(got[0][0], rounded_state[0][0], rtol=1e-6, atol=0)

    def test_linear_bf16_weights(self):
        g = generator(11)
        x, w, b = (torch.randn(7, 37, generator=g), torch.randn(45, 37, generator=g),
                   torch.randn(45, generator=g))
        low = w.bfloat16()
        got = _C.linear_bf16_weights_cpu(x, low, b)
        torch.testing.assert_close(got, torch.addmm(b, x, low.float().t()), rtol=1e-5, atol=1e-5)
        cases = [((x.double(), low, b), "x"), ((x, w, b), "w"), ((x, low, b.bfloat16()), "b"),
                 ((x[:, :30], low, b), "w"), ((x, low, b[:40]), "b"), ((x[0], low, b), "x")]
        for args, name in cases:
            with pytest.raises(RuntimeError, match=rf"^{name}\b"):
                _C.linear_bf16_weights_cpu(*args)

    @pytest.mark.parametrize("rows", [2, 3, 4, 5, 9])
    @pytest.mark.parametrize("k,n", [(37, 45), (64, 48), (70, 13), (256, 771)])
    def test_linear_bf16_weights_rows_together(self, rows, k, n):
        # rows taken together share each weight block; every output must keep the bits it
        # has when its row is taken alone (the screen's check recomputes single outputs)
        g = generator(100 * rows + k)
        x, w, b = (torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g),
                   torch.randn(n, generator=g))
        low = w.bfloat16()
        got = _C.linear_bf16_weights_cpu(x, low, b)
        alone = torch.cat([_C.linear_bf16_weights_cpu(x[i:i + 1], low, b) for i in range(rows)])
        assert torch.equal(got, alone)
        torch.testing.assert_close(got, torch.addmm(b, x, low.float().t()), rtol=1e-5, atol=1e-4)

    def test_bf16_weights_need_a_float32_gi(self):
        with pytest.raises(RuntimeError, match=r"^w_hh\b.*float32 gi"):
            _C.gru_layer_projected_cpu(torch.zeros(2, 1, 15, dtype=torch.float64),
                                       torch.zeros(1, 5, dtype=torch.float64),
                                       torch.zeros(15, 5, dtype=torch.bfloat16),
                                       torch.zeros(15, dtype=torch.float64))

    def test_gru_over_projection_needs_inference(self):
        flat = [torch.zeros(15, 5), torch.zeros(15, 5), torch.zeros(15), torch.zeros(15)]
        with pytest.raises(RuntimeError, match="^gru_over_projection"):
            ops.gru_over_projection(torch.zeros(4, 2, 15), torch.zeros(1, 2, 5), flat)
