"""The public API against the chapter (``../shared/seeds/000_*.txt``) and the reference.

* every name the chapter uses exists, with the reference's (or d2l's) signature;
* the chapter's own checks (shapes, ``sequence_mask``, the loss's 2:1:0 ratio);
* ``state_dict`` compatibility with the reference model, both ways, and equal outputs;
* the backend switch (``set_backend``, ``use_backend``, ``SEQ2SEQ_EXT_BACKEND``);
* training parity with ``reference.train_seq2seq``;
* the chapter's code run unchanged through ``import seq2seq_ext as d2l``.
"""
import inspect
import math
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import data, ops, reference

from helpers import random_ce_inputs

CHAPTER_NAMES = [
    'Encoder', 'Decoder', 'EncoderDecoder', 'Seq2SeqEncoder', 'Seq2SeqDecoder', 'sequence_mask',
    'MaskedSoftmaxCELoss', 'train_seq2seq', 'predict_seq2seq', 'bleu', 'grad_clipping',
    'try_gpu', 'Timer', 'Accumulator', 'Animator', 'load_array', 'Vocab', 'read_data_nmt',
    'preprocess_nmt', 'tokenize_nmt', 'truncate_pad', 'build_array_nmt', 'load_data_nmt',
]
REFERENCE_NAMES = [name for name in CHAPTER_NAMES if name in reference.__all__]

# d2l's own signatures (d2l/torch.py) of the names the reference does not define: the
# package may add trailing parameters with defaults, but must accept d2l's calls unchanged.
D2L_SIGNATURES = {
    'try_gpu': '(i=0)',
    'Timer': '()',
    'Accumulator': '(n)',
    'Animator': "(xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, "
                "xscale='linear', yscale='linear', fmts=('-', 'm--', 'g-.', 'r:'), nrows=1, "
                "ncols=1, figsize=(3.5, 2.5))",
    'load_array': '(data_arrays, batch_size, is_train=True)',
    'Vocab': '(tokens=None, min_freq=0, reserved_tokens=None)',
    'read_data_nmt': '()',
    'preprocess_nmt': '(text)',
    'tokenize_nmt': '(text, num_examples=None)',
    'truncate_pad': '(line, num_steps, padding_token)',
    'build_array_nmt': '(lines, vocab, num_steps)',
    'load_data_nmt': '(batch_size, num_steps, num_examples=600)',
}

DEVICE_STR = str(seq2seq_ext.try_gpu())
CHAPTER_LINE = re.compile(r'^loss (\d+\.\d{3}), (\d+\.\d) tokens/sec on (\S+)$', re.M)
TRANSLATION_LINE = re.compile(r'^(.+) => (.*), bleu (\S+)$', re.M)
ENGS = ['go .', "i lost .", 'he\'s calm .', 'i\'m home .']
FRAS = ['va !', 'j\'ai perdu .', 'il est calme .', 'je suis chez moi .']


pytestmark = pytest.mark.usefixtures("one_thread")


def _signature(obj):
    return inspect.signature(obj)


def _params(obj):
    return list(inspect.signature(obj).parameters.values())


def _number_data(n=200, batch_size=64, num_steps=10):
    return data.load_data_pairs(data.number_pairs(0, n), batch_size, num_steps)


def _build(mod, src_len, tgt_len, embed=32, hidden=32, layers=2, dropout=0, seed=0):
    torch.manual_seed(seed)
    encoder = mod.Seq2SeqEncoder(src_len, embed, hidden, layers, dropout)
    decoder = mod.Seq2SeqDecoder(tgt_len, embed, hidden, layers, dropout)
    return mod.EncoderDecoder(encoder, decoder)


# ----------------------------------------------------------------------------------------------
# public names and signatures
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', CHAPTER_NAMES)
def test_chapter_name_is_public(name):
    assert hasattr(seq2seq_ext, name), f'seq2seq_ext.{name} is missing'
    assert name in seq2seq_ext.__all__


def test_everything_in_all_exists():
    missing = [name for name in seq2seq_ext.__all__ if not hasattr(seq2seq_ext, name)]
    assert missing == []


@pytest.mark.parametrize('name', REFERENCE_NAMES)
def test_signature_equals_reference(name):
    ours, ref = getattr(seq2seq_ext, name), getattr(reference, name)
    # the reference's parameters, in order, then only options of our own (keyword-only, with
    # defaults: cell=, fixed_context=), so that every call of the chapter's works unchanged
    extra = [p for p in _params(ours)
             if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty]
    assert [p for p in _params(ours) if p not in extra] == _params(ref), (
        f'{name}{_signature(ours)} differs from the reference {name}{_signature(ref)}')
    if inspect.isclass(ref):
        for method in ('forward', 'init_state'):
            if hasattr(ref, method):
                assert _params(getattr(ours, method)) == _params(getattr(ref, method)), (
                    f'{name}.{method}')


def _params_of(signature):
    """The parameters of a function written with ``signature``, e.g. ``'(n, k=2)'``."""
    namespace = {}
    exec(f'def f{signature}: pass', namespace)
    return _params(namespace['f'])


@pytest.mark.parametrize('name', sorted(D2L_SIGNATURES))
def test_signature_accepts_d2l_calls(name):
    obj = getattr(seq2seq_ext, name)
    params, expected = _params(obj), _params_of(D2L_SIGNATURES[name])
    assert params[:len(expected)] == expected, f'{name}{_signature(obj)}'
    for p in params[len(expected):]:
        assert p.default is not inspect.Parameter.empty, f'{name}: extra parameter {p}'


def test_class_hierarchy():
    assert issubclass(seq2seq_ext.MaskedSoftmaxCELoss, nn.CrossEntropyLoss)
    assert issubclass(seq2seq_ext.Seq2SeqEncoder, seq2seq_ext.Encoder)
    assert issubclass(seq2seq_ext.Seq2SeqDecoder, seq2seq_ext.Decoder)
    for name in ('Encoder', 'Decoder', 'EncoderDecoder'):
        assert issubclass(getattr(seq2seq_ext, name), nn.Module)
    # isinstance checks written against the reference classes hold
    assert issubclass(seq2seq_ext.Seq2SeqEncoder, reference.Seq2SeqEncoder)
    assert issubclass(seq2seq_ext.Seq2SeqDecoder, reference.Seq2SeqDecoder)


def test_interfaces_raise_not_implemented():
    with pytest.raises(NotImplementedError):
        seq2seq_ext.Encoder()(torch.zeros(1))
    with pytest.raises(NotImplementedError):
        seq2seq_ext.Decoder().init_state(None)
    with pytest.raises(NotImplementedError):
        seq2seq_ext.Decoder()(torch.zeros(1), None)


# ----------------------------------------------------------------------------------------------
# the chapter's own checks
# ----------------------------------------------------------------------------------------------

def test_chapter_encoder_and_decoder_shapes():
    encoder = seq2seq_ext.Seq2SeqEncoder(vocab_size=10, embed_size=8, num_hiddens=16,
                                         num_layers=2)
    encoder.eval()
    X = torch.zeros((4, 7), dtype=torch.long)
    output, state = encoder(X)
    assert output.shape == (7, 4, 16)
    assert state.shape == (2, 4, 16)

    decoder = seq2seq_ext.Seq2SeqDecoder(vocab_size=10, embed_size=8, num_hiddens=16,
                                         num_layers=2)
    decoder.eval()
    state = decoder.init_state(encoder(X))
    output, state = decoder(X, state)
    assert output.shape == (4, 7, 10)
    assert state.shape == (2, 4, 16)


@pytest.mark.parametrize('backend', ops.BACKENDS)
def test_chapter_sequence_mask(backend):
    X = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with seq2seq_ext.use_backend(backend):
        out = seq2seq_ext.sequence_mask(X, torch.tensor([1, 2]))
    assert torch.equal(out, torch.tensor([[1, 0, 0], [4, 5, 0]]))
    # like the chapter's, it writes into its argument
    assert torch.equal(X, torch.tensor([[1, 0, 0], [4, 5, 0]]))


@pytest.mark.parametrize('backend', ops.BACKENDS)
def test_chapter_loss_ratio(backend):
    loss = seq2seq_ext.MaskedSoftmaxCELoss()
    with seq2seq_ext.use_backend(backend):
        l = loss(torch.ones(3, 4, 10), torch.ones((3, 4), dtype=torch.long),
                 torch.tensor([4, 2, 0]))
    assert l.shape == (3,)
    torch.testing.assert_close(l, torch.tensor([1.0, 0.5, 0.0]) * math.log(10))
    torch.testing.assert_close(l[0] / l[1], torch.tensor(2.0))
    assert l[2] == 0


# ----------------------------------------------------------------------------------------------
# state_dict compatibility with the reference model
# ----------------------------------------------------------------------------------------------

def test_state_dict_keys_and_shapes_equal_reference():
    ours = _build(seq2seq_ext, 11, 13, embed=8, hidden=16, layers=2)
    ref = _build(reference, 11, 13, embed=8, hidden=16, layers=2)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    # same seed, same construction order: the same initial weights
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('direction', ['ext_to_reference', 'reference_to_ext'])
def test_weights_load_both_ways_and_outputs_agree(direction):
    src_len, tgt_len = 17, 19
    ours = _build(seq2seq_ext, src_len, tgt_len, embed=8, hidden=16, layers=2, seed=1)
    ref = _build(reference, src_len, tgt_len, embed=8, hidden=16, layers=2, seed=2)
    if direction == 'ext_to_reference':
        ref.load_state_dict(ours.state_dict(), strict=True)
    else:
        ours.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k

    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, src_len, (5, 9), generator=g)
    dec_X = torch.randint(0, tgt_len, (5, 9), generator=g)
    valid_len = torch.randint(1, 10, (5,), generator=g)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        y, s = ours(X, dec_X, valid_len)
        y_ref, s_ref = ref(X, dec_X, valid_len)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(s, s_ref)
        with torch.no_grad():
            y, s = ours(X, dec_X, valid_len)
            y_ref, s_ref = ref(X, dec_X, valid_len)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('layers', [1, 2, 3])
def test_teacher_forced_gradients_equal_reference(dtype, layers):
    ours = _build(seq2seq_ext, 17, 19, embed=8, hidden=16, layers=layers, seed=9).to(dtype)
    ref = _build(reference, 17, 19, embed=8, hidden=16, layers=layers, seed=10).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(9)
    X = torch.randint(0, 17, (5, 9), generator=g)
    Y = torch.randint(0, 19, (5, 9), generator=g)
    valid_len = torch.randint(0, 10, (5,), generator=g)
    losses = []
    for net, loss in ((ours, seq2seq_ext.MaskedSoftmaxCELoss()),
                      (ref, reference.MaskedSoftmaxCELoss())):
        y_hat, _ = net(X, Y, valid_len)
        l = loss(y_hat, Y, valid_len)
        l.sum().backward()
        losses.append(l.detach())
    # float32: the fused GRU layer and loss sum in another order than nn.GRU / nn.CrossEntropyLoss
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m, n=name: f'{n}: {m}')


def test_loaded_weights_give_the_same_greedy_translations():
    train_iter, src_vocab, tgt_vocab = _number_data(300)
    ref = _build(reference, len(src_vocab), len(tgt_vocab), seed=4)
    ref.apply(reference.xavier_init_weights)  # spread the logits: no near-ties in the argmax
    ours = _build(seq2seq_ext, len(src_vocab), len(tgt_vocab), seed=5)
    ours.load_state_dict(ref.state_dict(), strict=True)
    sentences = ['one', 'two hundred', 'seventy seven', 'nine hundred ninety nine', 'unknown words',
                 'one two three four five six seven eight nine ten eleven twelve']
    for sentence in sentences:
        got, attention = seq2seq_ext.predict_seq2seq(ours, sentence, src_vocab, tgt_vocab, 10,
                                                     'cpu')
        want, _ = reference.predict_seq2seq(ref, sentence, src_vocab, tgt_vocab, 10, 'cpu')
        assert isinstance(got, str)
        assert got == want, sentence
        assert attention == []
    assert seq2seq_ext.predict_seq2seq_batch(ours, sentences, src_vocab, tgt_vocab, 10, 'cpu') \
        == [reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 10, 'cpu')[0]
            for s in sentences]


# ----------------------------------------------------------------------------------------------
# backend switch
# ----------------------------------------------------------------------------------------------

def test_default_backend_is_ext():
    assert seq2seq_ext.get_backend() == 'ext'
    assert ops.BACKENDS == ('ext', 'reference')


def test_set_backend():
    seq2seq_ext.set_backend('reference')
    assert seq2seq_ext.get_backend() == 'reference'
    assert ops.get_backend() == 'reference'
    seq2seq_ext.set_backend('ext')
    assert seq2seq_ext.get_backend() == 'ext'


def test_use_backend_nests_and_restores():
    start = seq2seq_ext.get_backend()
    with seq2seq_ext.use_backend('reference') as name:
        assert name == 'reference'
        assert seq2seq_ext.get_backend() == 'reference'
        with seq2seq_ext.use_backend('ext'):
            assert seq2seq_ext.get_backend() == 'ext'
            with seq2seq_ext.use_backend('reference'):
                assert seq2seq_ext.get_backend() == 'reference'
            assert seq2seq_ext.get_backend() == 'ext'
        assert seq2seq_ext.get_backend() == 'reference'
    assert seq2seq_ext.get_backend() == start


def test_use_backend_restores_after_an_exception_and_beats_set_backend():
    with pytest.raises(RuntimeError, match='boom'):
        with seq2seq_ext.use_backend('reference'):
            raise RuntimeError('boom')
    assert seq2seq_ext.get_backend() == 'ext'
    seq2seq_ext.set_backend('reference')
    with seq2seq_ext.use_backend('ext'):
        assert seq2seq_ext.get_backend() == 'ext'
    assert seq2seq_ext.get_backend() == 'reference'


def test_use_backend_is_per_thread():
    seen = {}

    def other_thread():
        seen['other'] = seq2seq_ext.get_backend()

    with seq2seq_ext.use_backend('reference'):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        seen['this'] = seq2seq_ext.get_backend()
    assert seen == {'this': 'reference', 'other': 'ext'}


@pytest.mark.parametrize('bad', ['cuda', 'Reference', '', None, 1])
def test_invalid_backend_is_a_value_error_naming_backend(bad):
    with pytest.raises(ValueError, match='backend'):
        seq2seq_ext.set_backend(bad)
    assert seq2seq_ext.get_backend() == 'ext'
    with pytest.raises(ValueError, match='backend'):
        with seq2seq_ext.use_backend(bad):
            pass  # pragma: no cover
    assert seq2seq_ext.get_backend() == 'ext'


def _backend_in_subprocess(value):
    env = dict(os.environ)
    env.pop('SEQ2SEQ_EXT_BACKEND', None)
    if value is not None:
        env['SEQ2SEQ_EXT_BACKEND'] = value
    return subprocess.run(
        [sys.executable, '-c', 'import seq2seq_ext; print(seq2seq_ext.get_backend())'],
        env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_selects_the_backend():
    proc = _backend_in_subprocess('reference')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'reference'
    proc = _backend_in_subprocess(None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'ext'


def test_invalid_environment_variable_fails_clearly():
    proc = _backend_in_subprocess('fast')
    assert proc.returncode != 0
    assert 'ValueError' in proc.stderr and 'backend' in proc.stderr and "'fast'" in proc.stderr
    assert 'SEQ2SEQ_EXT_BACKEND' in proc.stderr  # the message names the variable


def test_loss_under_reference_backend_equals_ext():
    pred, label, valid_len = random_ce_inputs(6, 9, 23, seed=7)
    pred.requires_grad_(True)
    loss = seq2seq_ext.MaskedSoftmaxCELoss()
    l_ext = loss(pred, label, valid_len)
    (g_ext,) = torch.autograd.grad(l_ext.sum(), pred)
    with seq2seq_ext.use_backend('reference'):
        l_ref = loss(pred, label, valid_len)
        (g_ref,) = torch.autograd.grad(l_ref.sum(), pred)
    # the fused op sums the log-sum-exp and the step mean in another order than
    # nn.CrossEntropyLoss: rtol 1e-5
    torch.testing.assert_close(l_ext, l_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ext, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_ref, reference.MaskedSoftmaxCELoss()(pred, label, valid_len),
                               rtol=0, atol=0)


def test_decoding_under_reference_backend_equals_ext():
    _, src_vocab, tgt_vocab = _number_data(300)
    net = _build(seq2seq_ext, len(src_vocab), len(tgt_vocab), seed=8)
    net.apply(seq2seq_ext.xavier_init_weights)
    sentences = ['three', 'four hundred twelve', 'eighty one', 'six hundred sixty six']
    ext = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, 'cpu')[0]
           for s in sentences]
    with seq2seq_ext.use_backend('reference'):
        ref = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, 'cpu')[0]
               for s in sentences]
        ref_batch = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 10,
                                                      'cpu')
    assert ext == ref == ref_batch
    assert all(isinstance(t, str) for t in ext)


@pytest.mark.parametrize('theta', [1e-3, 1.0, 1e6])
def test_grad_clipping_matches_reference(theta):
    nets = [_build(seq2seq_ext, 12, 14, embed=8, hidden=16, seed=6) for _ in range(2)]
    g = torch.Generator().manual_seed(6)
    X = torch.randint(0, 12, (3, 5), generator=g)
    Y = torch.randint(0, 14, (3, 5), generator=g)
    valid_len = torch.tensor([5, 2, 3])
    for net in nets:
        y_hat, _ = net(X, Y, valid_len)
        reference.MaskedSoftmaxCELoss()(y_hat, Y, valid_len).sum().backward()
    seq2seq_ext.grad_clipping(nets[0], theta)
    reference.grad_clipping(nets[1], theta)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p.grad, q.grad)  # d2l's numbers bit for bit
    if theta == 1e-3:
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in nets[0].parameters()))
        torch.testing.assert_close(norm, torch.tensor(theta), rtol=1e-5, atol=0)


def test_grad_clipping_is_d2ls_bit_for_bit_on_random_gradients():
    # a training loop amplifies last-bit differences: d2l's own loop must get d2l's gradients
    g = torch.Generator().manual_seed(61)
    for trial in range(100):
        shapes = [(int(torch.randint(1, 40, (1,), generator=g)),) * (1 + trial % 2)
                  for _ in range(1 + trial % 7)]
        grads = [torch.randn(s, generator=g) * float(torch.rand(1, generator=g) * 3)
                 for s in shapes]
        nets = []
        for _ in range(2):
            net = nn.Module()
            net.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)
            for p, gr in zip(net.ps, grads):
                p.grad = gr.clone()
            nets.append(net)
        seq2seq_ext.grad_clipping(nets[0], 1.0)
        reference.grad_clipping(nets[1], 1.0)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(nets[0].ps, nets[1].ps)), trial


def test_star_import_leaves_torch_nn_in_place():
    namespace = {}
    exec("from torch import nn\nfrom seq2seq_ext import *", namespace)
    assert namespace["nn"] is torch.nn
    assert namespace["grad_clipping"] is seq2seq_ext.grad_clipping
    assert namespace["accelerate"] is seq2seq_ext.accelerate


def test_grad_clipping_on_an_object_with_params():
    class Scratch:  # d2l's from-scratch models expose .params
        params = [torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)]

    for p in Scratch.params:
        p.grad = torch.full_like(p, 2.0)  # global norm sqrt(7 * 4)
    seq2seq_ext.grad_clipping(Scratch, 1)
    expected = 2.0 / math.sqrt(28.0)
    for p in Scratch.params:
        torch.testing.assert_close(p.grad, torch.full_like(p, expected))


# ----------------------------------------------------------------------------------------------
# training parity with the reference
# ----------------------------------------------------------------------------------------------

# Measured on the 200-pair number corpus, chapter sizes, dropout 0, 10 epochs (40 Adam steps),
# one thread: the largest parameter difference is 6.0e-7 under the extension backend (the fused
# loss's and the gradient norm's summation orders) and 3.6e-7 under the reference backend (the
# gradient norm's order only); after 20 epochs 2.2e-6. That is float32 rounding drift, using 5%
# of this tolerance (14% at 20 epochs); rtol 1e-5 is DESIGN.md's bound for a reduction order
# that differs from the reference's.
TRAIN_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('ignore:Attempting to set identical low and high xlims')
@pytest.mark.parametrize('backend', ops.BACKENDS)
def test_train_seq2seq_matches_reference(backend, capsys, _plot_into_tmp):
    seq2seq_ext.set_backend(backend)
    torch.manual_seed(0)
    train_iter, src_vocab, tgt_vocab = _number_data(200)
    ours = _build(seq2seq_ext, len(src_vocab), len(tgt_vocab), seed=1)
    ref = _build(reference, len(src_vocab), len(tgt_vocab), seed=99)
    ref.load_state_dict(ours.state_dict())
    num_epochs = 10

    torch.manual_seed(2)  # Xavier initialisation and the loader's shuffling
    seq2seq_ext.train_seq2seq(ours, train_iter, 0.005, num_epochs, tgt_vocab, 'cpu')
    out_ours = capsys.readouterr().out
    torch.manual_seed(2)
    reference.train_seq2seq(ref, train_iter, 0.005, num_epochs, tgt_vocab, 'cpu')
    out_ref = capsys.readouterr().out

    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TRAIN_TOL, msg=lambda m, k=k: f'{k}: {m}')
    assert any(not torch.equal(a[k], v) for k, v in _build(
        seq2seq_ext, len(src_vocab), len(tgt_vocab), seed=1).state_dict().items()), \
        'training changed nothing'

    for out in (out_ours, out_ref):
        lines = out.strip().splitlines()
        assert len(lines) == 1, out  # the last epoch only
        m = CHAPTER_LINE.fullmatch(lines[0])
        assert m, out
        assert m.group(3) == 'cpu'
        assert float(m.group(2)) > 0
    loss_ours = float(CHAPTER_LINE.search(out_ours).group(1))
    loss_ref = float(CHAPTER_LINE.search(out_ref).group(1))
    assert abs(loss_ours - loss_ref) <= 1.001e-3
    # the loss curve (every 10 epochs) went to SEQ2SEQ_EXT_PLOT, not into the working directory
    assert _plot_into_tmp.read_bytes().startswith(b'\x89PNG\r\n\x1a\n')


def test_train_seq2seq_is_deterministic(capsys):
    train_iter, src_vocab, tgt_vocab = _number_data(100)
    results = []
    for _ in range(2):
        net = _build(seq2seq_ext, len(src_vocab), len(tgt_vocab), seed=3)
        torch.manual_seed(4)
        seq2seq_ext.train_seq2seq(net, train_iter, 0.005, 3, tgt_vocab, 'cpu')
        results.append(net.state_dict())
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# the chapter's code, unchanged, through ``import seq2seq_ext as d2l``
# ----------------------------------------------------------------------------------------------

CHAPTER_PRELUDE = '''\
import collections
import math
import torch
from torch import nn
import seq2seq_ext as d2l
'''

# The chapter's code as written in 000_*.txt; only num_epochs is 3 instead of 300.
CHAPTER_CODE = CHAPTER_PRELUDE + '''\
class Seq2SeqEncoder(d2l.Encoder):
    """用于序列到序列学习的循环神经网络编码器"""
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers,
                 dropout=0, **kwargs):
        super(Seq2SeqEncoder, self).__init__(**kwargs)
        # 嵌入层
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers,
                          dropout=dropout)

    def forward(self, X, *args):
        # 输出'X'的形状:(batch_size,num_steps,embed_size)
        X = self.embedding(X)
        # 在循环神经网络模型中,第一个轴对应于时间步
        X = X.permute(1, 0, 2)
        # 如果未提及状态,则默认为0
        output, state = self.rnn(X)
        # output的形状:(num_steps,batch_size,num_hiddens)
        # state的形状:(num_layers,batch_size,num_hiddens)
        return output, state

class Seq2SeqDecoder(d2l.Decoder):
    """用于序列到序列学习的循环神经网络解码器"""
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers,
                 dropout=0, **kwargs):
        super(Seq2SeqDecoder, self).__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers,
                          dropout=dropout)
        # linear层只会对最后一个维度进行线性变换
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def init_state(self, enc_outputs, *args):
        return enc_outputs[1]

    def forward(self, X, state):
        # 输出'X'的形状:(batch_size,num_steps,embed_size)
        X = self.embedding(X).permute(1, 0, 2)
        # 广播context,使其具有与X相同的num_steps
        context = state[-1].repeat(X.shape[0], 1, 1)
        X_and_context = torch.cat((X, context), 2)
        output, state = self.rnn(X_and_context, state)
        output = self.dense(output).permute(1, 0, 2)
        # output的形状:(batch_size,num_steps,vocab_size)
        # state的形状:(num_layers,batch_size,num_hiddens)
        return output, state

def sequence_mask(X, valid_len, value=0):
    """在序列中屏蔽不相关的项"""
    maxlen = X.size(1)
    mask = torch.arange((maxlen), dtype=torch.float32,
                        device=X.device)[None, :] < valid_len[:, None]
    X[~mask] = value
    return X

X = torch.tensor([[1, 2, 3], [4, 5, 6]])
sequence_mask(X, torch.tensor([1, 2]))

class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """带遮蔽的softmax交叉熵损失函数"""
    # pred的形状:(batch_size,num_steps,vocab_size)
    # label的形状:(batch_size,num_steps)
    # valid_len的形状:(batch_size,)
    def forward(self, pred, label, valid_len):
        weights = torch.ones_like(label)
        weights = sequence_mask(weights, valid_len)
        self.reduction='none'
        unweighted_loss = super(MaskedSoftmaxCELoss, self).forward(
            pred.permute(0, 2, 1), label)
        weighted_loss = (unweighted_loss * weights).mean(dim=1)
        return weighted_loss

def train_seq2seq(net, data_iter, lr, num_epochs, tgt_vocab, device):
    """训练序列到序列模型"""
    def xavier_init_weights(m):
        if type(m) == nn.Linear:
            nn.init.xavier_uniform_(m.weight)
        if type(m) == nn.GRU:
            for param in m._flat_weights_names:
                if "weight" in param:
                    nn.init.xavier_uniform_(m._parameters[param])

    net.apply(xavier_init_weights)
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss = MaskedSoftmaxCELoss()
    net.train()
    animator = d2l.Animator(xlabel='epoch', ylabel='loss',
                            xlim=[10, num_epochs])
    for epoch in range(num_epochs):
        timer = d2l.Timer()
        metric = d2l.Accumulator(2)  # 训练损失总和,词元数量
        for batch in data_iter:
            optimizer.zero_grad()
            X, X_valid_len, Y, Y_valid_len = [x.to(device) for x in batch]
            bos = torch.tensor([tgt_vocab['<bos>']] * Y.shape[0],
                               device=device).reshape(-1, 1)
            dec_input = torch.cat([bos, Y[:, :-1]], 1)  # 强制教学
            Y_hat, _ = net(X, dec_input, X_valid_len)
            l = loss(Y_hat, Y, Y_valid_len)
            l.sum().backward()  # 损失函数的标量进行“反向传播”
            d2l.grad_clipping(net, 1)
            num_tokens = Y_valid_len.sum()
            optimizer.step()
            with torch.no_grad():
                metric.add(l.sum(), num_tokens)
        if (epoch + 1) % 10 == 0:
            animator.add(epoch + 1, (metric[0] / metric[1],))
    print(f'loss {metric[0] / metric[1]:.3f}, {metric[1] / timer.stop():.1f} '
          f'tokens/sec on {str(device)}')

embed_size, num_hiddens, num_layers, dropout = 32, 32, 2, 0.1
batch_size, num_steps = 64, 10
lr, num_epochs, device = 0.005, 3, d2l.try_gpu()

train_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(batch_size, num_steps)
encoder = Seq2SeqEncoder(len(src_vocab), embed_size, num_hiddens, num_layers,
                         dropout)
decoder = Seq2SeqDecoder(len(tgt_vocab), embed_size, num_hiddens, num_layers,
                         dropout)
net = d2l.EncoderDecoder(encoder, decoder)
train_seq2seq(net, train_iter, lr, num_epochs, tgt_vocab, device)

def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps,
                    device, save_attention_weights=False):
    """序列到序列模型的预测"""
    # 在预测时将net设置为评估模式
    net.eval()
    src_tokens = src_vocab[src_sentence.lower().split(' ')] + [
        src_vocab['<eos>']]
    enc_valid_len = torch.tensor([len(src_tokens)], device=device)
    src_tokens = d2l.truncate_pad(src_tokens, num_steps, src_vocab['<pad>'])
    # 添加批量轴
    enc_X = torch.unsqueeze(
        torch.tensor(src_tokens, dtype=torch.long, device=device), dim=0)
    enc_outputs = net.encoder(enc_X, enc_valid_len)
    dec_state = net.decoder.init_state(enc_outputs, enc_valid_len)
    # 添加批量轴
    dec_X = torch.unsqueeze(torch.tensor(
        [tgt_vocab['<bos>']], dtype=torch.long, device=device), dim=0)
    output_seq, attention_weight_seq = [], []
    for _ in range(num_steps):
        Y, dec_state = net.decoder(dec_X, dec_state)
        # 我们使用具有预测最高可能性的词元,作为解码器在下一时间步的输入
        dec_X = Y.argmax(dim=2)
        pred = dec_X.squeeze(dim=0).type(torch.int32).item()
        # 保存注意力权重(稍后讨论)
        if save_attention_weights:
            attention_weight_seq.append(net.decoder.attention_weights)
        # 一旦序列结束词元被预测,输出序列的生成就完成了
        if pred == tgt_vocab['<eos>']:
            break
        output_seq.append(pred)
    return ' '.join(tgt_vocab.to_tokens(output_seq)), attention_weight_seq

def bleu(pred_seq, label_seq, k):  #@save
    """计算BLEU"""
    pred_tokens, label_tokens = pred_seq.split(' '), label_seq.split(' ')
    len_pred, len_label = len(pred_tokens), len(label_tokens)
    score = math.exp(min(0, 1 - len_label / len_pred))
    for n in range(1, k + 1):
        num_matches, label_subs = 0, collections.defaultdict(int)
        for i in range(len_label - n + 1):
            label_subs[' '.join(label_tokens[i: i + n])] += 1
        for i in range(len_pred - n + 1):
            if label_subs[' '.join(pred_tokens[i: i + n])] > 0:
                num_matches += 1
                label_subs[' '.join(pred_tokens[i: i + n])] -= 1
        score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
    return score

engs = ['go .', "i lost .", 'he\\'s calm .', 'i\\'m home .']
fras = ['va !', 'j\\'ai perdu .', 'il est calme .', 'je suis chez moi .']
for eng, fra in zip(engs, fras):
    translation, attention_weight_seq = predict_seq2seq(
        net, eng, src_vocab, tgt_vocab, num_steps, device)
    print(f'{eng} => {translation}, bleu {bleu(translation, fra, k=2):.3f}')
'''

# The same script on the package's own ("@save") classes and functions, as later chapters
# call them.
PACKAGE_CODE = CHAPTER_PRELUDE + '''\
X = torch.tensor([[1, 2, 3], [4, 5, 6]])
d2l.sequence_mask(X, torch.tensor([1, 2]))

embed_size, num_hiddens, num_layers, dropout = 32, 32, 2, 0.1
batch_size, num_steps = 64, 10
lr, num_epochs, device = 0.005, 3, d2l.try_gpu()

train_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(batch_size, num_steps)
encoder = d2l.Seq2SeqEncoder(len(src_vocab), embed_size, num_hiddens, num_layers,
                             dropout)
decoder = d2l.Seq2SeqDecoder(len(tgt_vocab), embed_size, num_hiddens, num_layers,
                             dropout)
net = d2l.EncoderDecoder(encoder, decoder)
d2l.train_seq2seq(net, train_iter, lr, num_epochs, tgt_vocab, device)

engs = ['go .', "i lost .", 'he\\'s calm .', 'i\\'m home .']
fras = ['va !', 'j\\'ai perdu .', 'il est calme .', 'je suis chez moi .']
for eng, fra in zip(engs, fras):
    translation, attention_weight_seq = d2l.predict_seq2seq(
        net, eng, src_vocab, tgt_vocab, num_steps, device)
    print(f'{eng} => {translation}, bleu {d2l.bleu(translation, fra, k=2):.3f}')
'''


def _run_script(source, corpus, monkeypatch, capsys, seed=0):
    """Run ``source`` as a fresh module with the corpus given through SEQ2SEQ_EXT_DATA.
    Returns (namespace, printed output)."""
    monkeypatch.setenv(data.DATA_ENV, str(corpus))
    capsys.readouterr()
    torch.manual_seed(seed)
    namespace = {'__name__': '__chapter__'}
    exec(compile(source, '<chapter>', 'exec'), namespace)
    return namespace, capsys.readouterr().out


def _check_script_output(namespace, out):
    m = CHAPTER_LINE.search(out)
    assert m, out
    assert m.group(3) == DEVICE_STR
    assert math.isfinite(float(m.group(1))) and float(m.group(2)) > 0
    found = TRANSLATION_LINE.findall(out)
    assert [eng for eng, _, _ in found] == ENGS, out
    for _, translation, score in found:
        assert math.isfinite(float(score)) and 0 <= float(score) <= 1
    assert isinstance(namespace['translation'], str)
    assert torch.equal(namespace['X'], torch.tensor([[1, 0, 0], [4, 5, 0]]))
    assert len(namespace['train_iter'].dataset) == 601  # d2l's num_examples=600 semantics
    return float(m.group(1)), [translation for _, translation, _ in found]


def test_chapter_code_runs_unchanged(small_corpus, monkeypatch, capsys):
    namespace, out = _run_script(CHAPTER_CODE, small_corpus, monkeypatch, capsys)
    _check_script_output(namespace, out)
    # the user's classes stand on the package's interfaces
    assert isinstance(namespace['net'], seq2seq_ext.EncoderDecoder)
    assert isinstance(namespace['encoder'], seq2seq_ext.Encoder)
    assert isinstance(namespace['decoder'], seq2seq_ext.Decoder)


def test_chapter_code_on_package_functions(small_corpus, monkeypatch, capsys):
    namespace, out = _run_script(PACKAGE_CODE, small_corpus, monkeypatch, capsys)
    _check_script_output(namespace, out)
    assert type(namespace['decoder']) is seq2seq_ext.Seq2SeqDecoder
    assert namespace['attention_weight_seq'] == []


def test_package_functions_give_the_chapter_numbers(small_corpus, monkeypatch, capsys):
    """Same seed, same data: the package's functions print what the chapter's code prints
    (the loss to within one unit of its last printed digit, the same translations). Compared on
    the CPU, where both models draw their dropout masks from the same generator."""
    monkeypatch.setattr(seq2seq_ext, 'try_gpu', lambda i=0: torch.device('cpu'))
    ns1, out1 = _run_script(CHAPTER_CODE, small_corpus, monkeypatch, capsys, seed=5)
    ns2, out2 = _run_script(PACKAGE_CODE, small_corpus, monkeypatch, capsys, seed=5)
    loss1, translations1 = _check_script_output(ns1, out1)
    loss2, translations2 = _check_script_output(ns2, out2)
    assert abs(loss1 - loss2) <= 1.001e-3, (out1, out2)
    assert translations1 == translations2, (out1, out2)
    src_vocab, tgt_vocab = ns1['src_vocab'], ns1['tgt_vocab']
    for n in (3, 21, 80, 101, 345, 699):
        sentence = data.english_number(n)
        mine = ns1['predict_seq2seq'](ns1['net'], sentence, src_vocab, tgt_vocab, 10, 'cpu')[0]
        ours = seq2seq_ext.predict_seq2seq(ns2['net'], sentence, ns2['src_vocab'],
                                           ns2['tgt_vocab'], 10, 'cpu')[0]
        assert mine == ours, sentence
        # the chapter's step-by-step loop on the package's decoder (its fused one-step path)
        assert ns1['predict_seq2seq'](ns2['net'], sentence, ns2['src_vocab'], ns2['tgt_vocab'],
                                      10, 'cpu')[0] == ours, sentence
    for k, v in ns1['net'].state_dict().items():
        torch.testing.assert_close(v, ns2['net'].state_dict()[k], **TRAIN_TOL)


def test_real_corpus_load_and_short_training(fra_eng_path, monkeypatch, capsys):
    torch.manual_seed(0)
    train_iter, src_vocab, tgt_vocab = seq2seq_ext.load_data_nmt(64, 10, path=fra_eng_path)
    # d2l's semantics on this file: 601 pairs and min_freq=2 vocabularies
    assert len(train_iter.dataset) == 601
    assert (len(src_vocab), len(tgt_vocab)) == (189, 201)
    assert src_vocab.idx_to_token[:4] == ['<unk>', '<pad>', '<bos>', '<eos>']
    X, X_valid_len, Y, Y_valid_len = next(iter(train_iter))
    assert X.shape == Y.shape == (64, 10)

    monkeypatch.setenv(data.DATA_ENV, str(fra_eng_path))
    it2, src2, tgt2 = seq2seq_ext.load_data_nmt(64, 10)
    assert src2.idx_to_token == src_vocab.idx_to_token
    assert tgt2.idx_to_token == tgt_vocab.idx_to_token
    assert torch.equal(it2.dataset.tensors[0], train_iter.dataset.tensors[0])

    net = _build(seq2seq_ext, len(src_vocab), len(tgt_vocab))
    capsys.readouterr()
    seq2seq_ext.train_seq2seq(net, train_iter, 0.005, 2, tgt_vocab, 'cpu')
    out = capsys.readouterr().out
    m = CHAPTER_LINE.search(out)
    assert m and m.group(3) == 'cpu', out
    assert 0 < float(m.group(1)) < 10
    for eng, fra in zip(ENGS, FRAS):
        translation, _ = seq2seq_ext.predict_seq2seq(net, eng, src_vocab, tgt_vocab, 10, 'cpu')
        assert isinstance(translation, str)
        assert all(t in tgt_vocab.token_to_idx for t in translation.split(' ') if t)
