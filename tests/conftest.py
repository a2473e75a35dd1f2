"""Fixtures shared by the test files.

* Every test runs with ``SEQ2SEQ_EXT_PLOT`` pointing into a temporary directory, so that
  ``train_seq2seq``'s loss curve (``Animator``) never lands as ``loss.png`` in the repository.
* The backend in force before a test is restored after it, whatever the test selected.
* Float32 is float32: TF32 is off for matmuls and cuDNN in every test (on Ampere and later GPUs
  the reference's ``nn.GRU``/``nn.LSTM`` and matmuls may otherwise use TF32, and the float32
  parity tolerances would fail against the reference, not against the package).
* ``nn.GRU`` and ``nn.LSTM`` refuse a non-contiguous initial state in every test, on the CPU
  too, as cuDNN does on a GPU ("rnn: hx is not contiguous"): a test that hands the reference a
  sliced or transposed state fails here, not first on a GPU.
* ``fra_eng_path``: the shared English-French corpus (skips when the file is absent).
* ``small_corpus``: a small generated English-French file in d2l's ``fra.txt`` format.
"""
import functools
import os
from pathlib import Path

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import _C, ops
from seq2seq_ext.data import number_pairs
from seq2seq_ext.utils import PLOT_ENV

#: The shared corpus, ``../shared/data/fra-eng.txt`` relative to the repository root.
FRA_ENG_PATH = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'fra-eng.txt'

#: The chapter's example pairs as they appear at the top of d2l's fra.txt.
CHAPTER_LINES = [('Go.', 'Va !'), ('I lost.', "J'ai perdu."), ("He's calm.", 'Il est calme.'),
                 ("I'm home.", 'Je suis chez moi.')]


@pytest.fixture(autouse=True, scope='session')
def _plot_into_tmp(tmp_path_factory):
    """Send the default loss-curve PNG to a temporary directory for the whole session."""
    target = tmp_path_factory.mktemp('plots') / 'loss.png'
    old = os.environ.get(PLOT_ENV)
    os.environ[PLOT_ENV] = str(target)
    yield target
    if old is None:
        os.environ.pop(PLOT_ENV, None)
    else:
        os.environ[PLOT_ENV] = old


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off for matmuls and cuDNN during the test, restored after it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = False
    cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = before


def _contiguous_state_only(forward, name):
    """``forward`` of nn.GRU / nn.LSTM that first applies cuDNN's rule on the initial state."""
    @functools.wraps(forward)
    def checked(self, input, hx=None):
        if hx is not None and not torch.compiler.is_compiling():
            for i, h in enumerate(hx if isinstance(hx, tuple) else (hx,)):
                if isinstance(h, torch.Tensor) and not h.is_contiguous():
                    raise AssertionError(
                        f"{name} called with a non-contiguous initial state (hx[{i}], shape "
                        f"{tuple(h.shape)}, strides {h.stride()}): cuDNN refuses it on a GPU "
                        "('rnn: hx is not contiguous'); pass .contiguous()")
        return forward(self, input, hx)
    return checked


@pytest.fixture(autouse=True, scope='session')
def _rnn_states_contiguous():
    """nn.GRU / nn.LSTM refuse non-contiguous initial states for the whole session."""
    saved = {cls: cls.forward for cls in (torch.nn.GRU, torch.nn.LSTM)}
    for cls, forward in saved.items():
        cls.forward = _contiguous_state_only(forward, cls.__name__)
    yield
    for cls, forward in saved.items():
        cls.forward = forward


@pytest.fixture(autouse=True)
def _restore_backend():
    """Put back the backend that was in force before the test."""
    before = seq2seq_ext.get_backend()
    yield
    ops.set_backend(before)


@pytest.fixture(scope='session')
def fra_eng_path():
    """Path of the shared fra-eng corpus; the test is skipped when the file is absent."""
    if not FRA_ENG_PATH.is_file():
        pytest.skip(f'the English-French corpus is not available at {FRA_ENG_PATH}')
    return FRA_ENG_PATH


def _fra_line(english, french):
    """One ``english<TAB>french`` line written like d2l's fra.txt: capitalised sentences,
    English punctuation attached, French punctuation after a (narrow) no-break space."""
    return f'{english.capitalize()}.\t{french.capitalize()}\u202f!'


def write_small_corpus(path, stop=700):
    """Write a d2l-style fra.txt: the chapter's four example pairs (twice, so that their tokens
    reach the vocabularies' ``min_freq=2``), then English/French number names 1..stop-1."""
    lines = [f'{en}\t{fr}' for en, fr in CHAPTER_LINES] * 2
    lines += [_fra_line(en, fr) for en, fr in number_pairs(1, stop)]
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


@pytest.fixture
def small_corpus(tmp_path):
    """A small generated English-French corpus (708 pairs) in d2l's fra.txt format."""
    return write_small_corpus(tmp_path / 'fra.txt')


@pytest.fixture
def one_thread():
    """One torch thread for the test: small matrices run faster and steadier on a shared
    2-core machine, and bitwise comparisons do not depend on the other core's load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rounded_bf16_gemm():
    """bf16 products as ``reference``'s ``product_dtype=torch.bfloat16`` writes them out (the
    ``"rounded"`` mode: float32 sums of exact bf16 products), for the tests that compare with it
    on any CPU. ``"native"``, the default where the CPU has bf16 instructions, rounds its GEMMs'
    results to bf16 and is checked against the reference within bf16's precision
    (``test_either_way_of_running_products``). The process's own mode is restored."""
    before = ops.bf16_gemm()
    ops.set_bf16_gemm("rounded")
    yield
    ops.set_bf16_gemm(before)


@pytest.fixture
def deferred(request):
    """The deferred weight-gradient mode ``request.param`` (``ops.set_deferred_grads``; tests
    parametrize it indirectly), the process's own mode restored."""
    before = ops.deferred_grads()
    ops.set_deferred_grads(request.param)
    yield request.param
    ops.set_deferred_grads(before)


@pytest.fixture(params=["rounded", "native"])
def bf16_gemm(request):
    """Each way of running bf16 products (ops.set_bf16_gemm), the process's own mode restored."""
    before = ops.bf16_gemm()
    ops.set_bf16_gemm(request.param)
    yield request.param
    ops.set_bf16_gemm(before)


@pytest.fixture(params=[False, True], ids=["amx-off", "amx-on"])
def amx_products(request):
    """Each way of running the few-row bf16 products (ops.set_amx_products: on AMX tiles or as
    ATen bf16 GEMMs); on skips where the CPU or OS does not run AMX-BF16. The process's own mode
    is restored."""
    if request.param and not _C.amx_usable():
        pytest.skip("needs a CPU and OS that run AMX-BF16")
    before = ops.amx_products()
    ops.set_amx_products(request.param)
    yield request.param
    ops.set_amx_products(before)
