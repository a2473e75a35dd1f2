"""benchmarks/dropin.py (seq2seq_ext.bench.dropin): the ceiling's stub and the cases at tiny
sizes, so that a change that makes the ceiling wrong or breaks the script fails here."""
import random

import pytest
import torch

from seq2seq_ext.bench import dropin, seed_models


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_stub_keeps_the_optimizers_work_on_the_recurrent_weights(cell):
    torch.manual_seed(0)
    plain = seed_models.Seq2Seq(7, 9, 4, 6, 2, 0.0, cell=cell)
    stub = dropin.stubbed(plain)
    assert sum(p.numel() for p in stub.parameters()) == sum(p.numel() for p in plain.parameters())
    rnn_weights = [p for m in stub.modules() if isinstance(m, dropin.StubRNN) for p in m.weights]
    assert len(rnn_weights) == 2 * 4 * 2  # encoder and decoder, 2 layers, 4 tensors each
    opt = torch.optim.Adam(stub.parameters(), lr=1e-3)
    src, trg = seed_models.batch(3, 5, 7, 9)
    coins = random.Random(0)
    for _ in range(2):  # the second step too: the zero gradient comes once a backward
        before = [w.detach().clone() for w in rnn_weights]
        seed_models.train_step(stub, opt, src, trg, coins)
        assert all(w.grad is not None and not w.grad.any() for w in rnn_weights)
        # Adam with zero gradients moves nothing, but it has visited every weight
        assert all(torch.equal(w, b) for w, b in zip(rnn_weights, before))
        assert all(opt.state[w]["step"] == opt.state[rnn_weights[0]]["step"] for w in rnn_weights)


def test_stub_costs_no_gradient_without_grad_mode():
    torch.manual_seed(0)
    stub = dropin.stubbed(seed_models.Decoder(9, 4, 6, 2, 0.0, cell="gru"))
    with torch.no_grad():
        stub(torch.tensor([1]), torch.zeros(2, 1, 6))
    assert all(not m.pending for m in stub.modules() if isinstance(m, dropin.StubRNN))


def test_chapter_predict_stub_runs_as_many_decoder_calls_as_the_models(monkeypatch):
    calls = {}
    real = dropin.StubRNN.forward

    def counting(self, x, hx=None):
        calls["stub"] = calls.get("stub", 0) + 1
        return real(self, x, hx)
    monkeypatch.setattr(dropin.StubRNN, "forward", counting)
    times, _ = dropin.chapter_predict_case(1)
    assert set(times) == {"plain", "accelerated", "stub"}
    # warm-up and one round: 2 passes over the sentences; encoder + decoder calls per sentence
    src_vocab, tgt_vocab = dropin.common.toy_vocabs()
    _, plain = dropin.common.chapter_models(len(src_vocab), len(tgt_vocab))
    out = [dropin.R.predict_seq2seq(plain, s, src_vocab, tgt_vocab, 10, "cpu")[0]
           for s in dropin.common.CHAPTER_SENTENCES]
    decoder_calls = sum(min(10, len(t.split()) + 1) for t in out)
    # the case's own check runs the stub once more; each sentence also runs the encoder
    encoder_calls = len(out)
    assert calls["stub"] == 3 * (decoder_calls + encoder_calls)
