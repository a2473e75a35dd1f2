"""seq2seq_ext: the d2l.ai GRU encoder-decoder with fused C++/CUDA ops.

``import seq2seq_ext as d2l`` gives the names the chapter uses, with the same signatures and
results; the hot work runs in the compiled library (``seq2seq_ext.ops``). Select the pure-PyTorch
reference with ``set_backend("reference")``, ``with use_backend("reference"):`` or
``SEQ2SEQ_EXT_BACKEND=reference``.
"""
from . import _optim_versions, checkpoint, ops, reference
from .ops import get_backend, set_backend, use_backend
from .ops import sequence_mask_ as sequence_mask
from .models import Decoder, Encoder, EncoderDecoder, Seq2SeqDecoder, Seq2SeqEncoder
from .losses import MaskedSoftmaxCELoss
from .training import grad_clipping, train_seq2seq, xavier_init_weights
from .decoding import predict_seq2seq, predict_seq2seq_batch
from .beam import beam_search
from . import nn
from .nn import accelerate
from .metrics import bleu, corpus_bleu
from .utils import Accumulator, Animator, Timer, try_gpu
from .data import (Vocab, build_array_nmt, load_array, load_data_nmt, load_data_numbers,
                   preprocess_nmt, read_data_nmt, tokenize_nmt, truncate_pad)

__version__ = "0.1.0"

__all__ = [
    "Encoder", "Decoder", "EncoderDecoder", "Seq2SeqEncoder", "Seq2SeqDecoder",
    "sequence_mask", "MaskedSoftmaxCELoss", "train_seq2seq", "predict_seq2seq",
    "predict_seq2seq_batch", "beam_search", "bleu", "corpus_bleu", "grad_clipping", "xavier_init_weights",
    "try_gpu", "Timer", "Accumulator", "Animator", "load_array", "Vocab", "read_data_nmt",
    "preprocess_nmt", "tokenize_nmt", "truncate_pad", "build_array_nmt", "load_data_nmt",
    "load_data_numbers", "get_backend", "set_backend", "use_backend", "ops", "reference",
    "accelerate",
]  # not "nn": ``from seq2seq_ext import *`` (d2l's star import) must leave torch's nn in place
