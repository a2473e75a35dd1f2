"""pytest-benchmark suites: reference and extension side by side in the same group.

    .venv/bin/python -m pytest benchmarks/test_bench.py --benchmark-enable --benchmark-columns=median,iqr,rounds

Groups: op (the fused loss), model (the decoder step), end to end (translation). Run with one
thread (the fixture sets it) and compare medians within a group.
"""
import pytest
import torch

from seq2seq_ext.bench import common
import seq2seq_ext as d2l
from seq2seq_ext import reference as R

IMPLS = {"reference": R, "extension": d2l}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab))
    return {"extension": net, "reference": ref}, src_vocab, tgt_vocab


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", [(64, 10, 201), (128, 30, 10000)], ids=str)
def test_masked_ce_fwd_bwd(benchmark, impl, shape):
    benchmark.group = f"op: masked CE fwd+bwd {shape}"
    pred, label, valid_len = common.ce_inputs(*shape)
    benchmark(common.ce_fwd_bwd(IMPLS[impl].MaskedSoftmaxCELoss()), pred, label, valid_len)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_decoder_step(benchmark, impl, models):
    benchmark.group = "model: decoder one step, batch 1"
    nets, src_vocab, tgt_vocab = models
    net = nets[impl]
    with torch.no_grad():
        state = net.encoder(torch.randint(0, len(src_vocab), (1, 10)))[1]
        tok = torch.tensor([[tgt_vocab['<bos>']]])
        benchmark(lambda: net.decoder(tok, state))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_predict_chapter_sentences(benchmark, impl, models):
    benchmark.group = "end to end: predict_seq2seq x 4"
    nets, src_vocab, tgt_vocab = models
    mod, net = IMPLS[impl], nets[impl]
    benchmark(lambda: [mod.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, 'cpu')
                       for s in common.CHAPTER_SENTENCES])


@pytest.mark.parametrize("impl", ["reference-loop", "extension-batched"])
def test_translate_1000(benchmark, impl, models):
    benchmark.group = "end to end: 1,000 sentences"
    nets, src_vocab, tgt_vocab = models
    sents = common.sentences(1000, src_vocab)
    if impl == "reference-loop":
        benchmark.pedantic(lambda: [R.predict_seq2seq(nets["reference"], s, src_vocab, tgt_vocab,
                                                      10, 'cpu') for s in sents], rounds=1)
    else:
        benchmark(lambda: d2l.predict_seq2seq_batch(nets["extension"], sents, src_vocab,
                                                    tgt_vocab, 10, 'cpu'))
