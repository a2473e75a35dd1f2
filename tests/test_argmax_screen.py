"""The int8 screen of greedy decoding's argmax (csrc/cpu/argmax_screen.h,
``ops.set_argmax_screen``): the index it finds is the full product's, on random layers and on
layers built to tie, and greedy decoding gives the same tokens with it as without it.
"""
import pytest
import torch

from seq2seq_ext import _C, ops

from helpers import generator

USABLE = ops.argmax_screen_usable()
needs_int8 = pytest.mark.skipif(not USABLE, reason="neither an AVX-512 build on a CPU with "
                                "AVX512-VNNI nor an AVX2 build: the screen does not run here")


def screened(w, bias, h):
    out = _C._screened_argmax(w.contiguous(), bias.contiguous(), h.contiguous())
    assert out is not None, "the screen should apply to this layer"
    return out


def rand(g, *shape, scale=1.0):
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).float()


@needs_int8
class TestScreenedArgmax:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    # K past a whole number of vectors (203, 67: the last 3 columns in a partial vector of 8 or
    # 16) and V past a whole number of four-row blocks
    @pytest.mark.parametrize("V,K", [(3909, 256), (1331, 200), (777, 352), (600, 1024),
                                     (1301, 203), (4001, 67)])
    def test_random_layers(self, dtype, V, K):
        g = generator(V + K)
        w = rand(g, V, K, scale=1 / K ** 0.5).to(dtype)
        bias = rand(g, V, scale=0.1)
        h = torch.cat([rand(g, 24, K, scale=s) for s in (0.05, 1.0, 30.0)])
        best, computed, full = screened(w, bias, h)
        assert torch.equal(best, full)
        # untrained-like logits are close together, yet most rows are never computed
        assert computed.max().item() < V // 4

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_rows_that_tie_but_for_rounding(self, dtype):
        """Rows that are permutations of one row, against a state with equal entries: the same
        logit in exact arithmetic, different roundings of it. Only the full product's own
        operations find the index it finds; a bound that ignored the rounding would not."""
        g = generator(7)
        V, K = 2048, 256
        base = rand(g, K, scale=0.2).to(dtype)
        perms = torch.stack([torch.randperm(K, generator=g) for _ in range(V)])
        w = base[perms]
        bias = torch.zeros(V)
        h = torch.full((4, K), 0.37)
        h[1] = -1.3
        h[2] = 1e-3
        h[3, ::2] = 0.5  # two values: the sums still tie in exact arithmetic only per parity
        best, computed, full = screened(w, bias, h)
        assert torch.equal(best, full)
        assert computed.min().item() > 1  # the tie leaves many candidates

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_exact_ties_take_the_first(self, dtype):
        g = generator(3)
        V, K = 1024, 256
        w = rand(g, V, K, scale=0.06).to(dtype)
        w[700] = w[300]
        w[900] = w[300]
        bias = rand(g, V, scale=0.01)
        bias[700] = bias[900] = bias[300] = 5.0  # rows 300, 700 and 900 lead, equal
        h = rand(g, 3, K)
        best, _, full = screened(w, bias, h)
        assert torch.equal(best, full)
        assert best.tolist() == [300, 300, 300]

    def test_near_ties_within_the_int8_step(self):
        """Rows closer together than int8 resolves: the bounds must keep all of them."""
        g = generator(11)
        V, K = 1500, 256
        w = rand(g, 1, K, scale=0.1).expand(V, K) + rand(g, V, K, scale=1e-5)
        bias = torch.zeros(V)
        h = rand(g, 16, K)
        best, computed, full = screened(w, bias, h)
        assert torch.equal(best, full)
        assert computed.min().item() > 1

    def test_bound_covers_the_weights_rounding(self):
        """Row 1's int8 copy is 0.49 of a step low in every column, row 2's exact: the int8
        sums rank row 2 first by a wide margin (more than the state's rounding and the float
        margin cover), yet row 1's logit is the larger. Without the weights' rounding error in
        the bound, row 1 would not be a candidate."""
        V, K = 1024, 256
        w = torch.zeros(V, K)
        w[1, 0] = w[2, 0] = 1.0  # both rows' scale 1/127
        w[1, 1:] = 10.49 / 127   # stored as 10 steps
        w[2, 1:3] = 1.0          # whole steps: 127 * 3 + 10 * 133 + 9 * 120 = 2791, logit 21.98
        w[2, 3:136] = 10 / 127
        w[2, 136:] = 9 / 127
        bias = torch.zeros(V)
        h = torch.ones(1, K)
        logits = (w.double() @ h[0].double())
        assert logits.argmax().item() == 1 and 21.9 < logits[2] < logits[1] - 0.05
        best, _, full = screened(w, bias, h)
        assert best.tolist() == full.tolist() == [1]

    def test_bound_covers_the_states_rounding(self):
        """The state's int8 copy is 0.49 of a step low in all columns but the first: the int8
        sums rank row 2 (which reads only the first) above row 1 (which reads them all), whose
        logit is the larger. Without the state's rounding error in the bound, row 1 would not
        be a candidate."""
        V, K = 1024, 256
        w = torch.zeros(V, K)
        w[1] = 1.0
        w[2, 0] = 21.9
        bias = torch.zeros(V)
        h = torch.full((1, K), 10.49 / 127)
        h[0, 0] = 1.0
        logits = (w.double() @ h[0].double())
        assert logits.argmax().item() == 1
        best, _, full = screened(w, bias, h)
        assert best.tolist() == full.tolist() == [1]

    def test_state_that_is_not_finite_takes_the_full_product(self):
        g = generator(5)
        V, K = 1024, 256
        w = rand(g, V, K, scale=0.06)
        bias = rand(g, V)
        h = rand(g, 4, K)
        h[0, 3] = float("nan")
        h[1, 7] = float("inf")
        h[2, 9] = -float("inf")
        best, computed, full = screened(w, bias, h)
        assert torch.equal(best, full)
        assert computed[:3].tolist() == [V] * 3
        assert computed[3].item() < V

    def test_tiny_states(self):
        """States so small that the state's int8 scale times a row's is not a normal float
        (max |h| 1e-36 and below against rows of max 0.06): subnormal products round by absolute
        amounts the bounds' relative margin does not cover, so they take the full product; a
        small but normal one is screened."""
        g = generator(13)
        V, K = 1024, 256
        w = rand(g, V, K, scale=0.06)
        bias = torch.zeros(V)
        for scale, screens in [(1e-30, True), (1e-36, False), (1e-37, False), (3e-38, False),
                               (1e-39, False), (1e-44, False)]:
            h = rand(g, 4, K, scale=scale)
            best, computed, full = screened(w, bias, h)
            assert torch.equal(best, full), scale
            if screens:
                assert computed.max().item() < V // 4, scale
            else:
                assert computed.tolist() == [V] * 4, scale

    def test_zero_state_is_the_bias_argmax(self):
        g = generator(9)
        V, K = 1024, 256
        w = rand(g, V, K, scale=0.06)
        bias = rand(g, V)
        best, _, full = screened(w, bias, torch.zeros(2, K))
        assert best.tolist() == [int(bias.argmax())] * 2 and torch.equal(best, full)

    def test_layers_it_does_not_take(self):
        g = generator(1)
        w = rand(g, 1024, 256)
        w[5, 5] = float("nan")
        assert _C._screened_argmax(w, torch.zeros(1024), torch.zeros(1, 256)) is None
        # too small to pay, and too wide for exact int32 sums
        assert _C._screened_argmax(rand(g, 200, 64), torch.zeros(200), torch.zeros(1, 64)) is None
        assert _C._screened_argmax(rand(g, 600, 2048), torch.zeros(600),
                                   torch.zeros(1, 2048)) is None

    def test_switch(self):
        g = generator(2)
        w, bias, h = rand(g, 1024, 256), torch.zeros(1024), torch.zeros(1, 256)
        try:
            ops.set_argmax_screen(False)
            assert not ops.argmax_screen()
            assert _C._screened_argmax(w, bias, h) is None
        finally:
            ops.set_argmax_screen(True)
        assert ops.argmax_screen() and _C._screened_argmax(w, bias, h) is not None


def test_switch_takes_a_bool():
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        ops.set_argmax_screen(1)
    assert ops.argmax_screen() is True


@pytest.mark.skipif(USABLE, reason="the screen runs on this CPU and build")
def test_no_screen_without_int8_products():
    w = torch.randn(1024, 256)
    assert _C._screened_argmax(w, torch.zeros(1024), torch.zeros(1, 256)) is None


def _stepper(seed, vocab, hidden=256, embed=128, layers=2):
    g = generator(seed)
    gru = torch.nn.GRU(embed + hidden, hidden, layers)
    with torch.no_grad():
        for p in gru.parameters():
            p.copy_(rand(g, *p.shape, scale=hidden ** -0.5))
    emb = rand(g, vocab, embed)
    dense_w = rand(g, vocab, hidden, scale=hidden ** -0.5)
    dense_b = rand(g, vocab, scale=0.05)
    stepper = _C.DecoderStepper(emb, [w.detach() for w in gru._flat_weights], dense_w, dense_b)
    return stepper, g, dense_w, dense_b


@needs_int8
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16_weights"])
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("context", [True, False], ids=["ctx_proj", "context_columns"])
def test_greedy_gives_the_same_tokens(bf16, batch, context):
    """DecoderStepper.greedy (predict_seq2seq's loop) with the screen and without it. At batch
    6 float32's output layer goes to BLAS and is not screened; bf16's always is."""
    stepper, g, _, _ = _stepper(batch, vocab=2003)
    hidden = 256
    for trial in range(6):
        state = rand(g, 2, batch, hidden, scale=0.2 + trial)
        ctx = rand(g, batch, 3 * hidden, scale=0.3) if context else None
        got = []
        for on in (True, False):
            ops.set_argmax_screen(on)
            try:
                got.append(stepper.greedy(state, ctx, 1, 2, 12, bf16))
            finally:
                ops.set_argmax_screen(True)
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@needs_int8
def test_weights_changed_in_place_rebuild_the_screen():
    stepper, g, dense_w, dense_b = _stepper(4, vocab=1500)
    state = rand(g, 2, 1, 256, scale=0.5)
    ctx = rand(g, 1, 768, scale=0.3)
    before = stepper.greedy(state, ctx, 1, 2, 8, False)[0]
    # the rows in reverse order, in place: a stale screen would miss the new maxima
    dense_w.copy_(dense_w.flip(0))
    dense_b.copy_(dense_b.flip(0))
    after = stepper.greedy(state, ctx, 1, 2, 8, False)[0]
    ops.set_argmax_screen(False)
    try:
        want = stepper.greedy(state, ctx, 1, 2, 8, False)[0]
    finally:
        ops.set_argmax_screen(True)
    assert torch.equal(after, want)
    assert not torch.equal(before, after)
