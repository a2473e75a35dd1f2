"""Worker for tests/test_distributed.py, launched by ``torchrun``.

``python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_worker.py OUT_DIR``
trains a small seq2seq model on a fixed slice of the built-in numbers corpus with
:func:`seq2seq_ext.training.fit`, fed by :func:`seq2seq_ext.distributed.shard_loader` without
shuffling, once per configuration of :data:`CONFIGS`, and saves this rank's final parameters
and per-epoch losses to ``OUT_DIR/rank{R}.pt``. :func:`train_single` trains the same model in
one process on the same global batches, for comparison.
"""
import os
import random
import sys

import torch
from torch.utils import data as tdata

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seq2seq_ext import EncoderDecoder, Seq2SeqDecoder, Seq2SeqEncoder, distributed  # noqa: E402
from seq2seq_ext.data import load_data_numbers  # noqa: E402
from seq2seq_ext.training import fit  # noqa: E402

NUM_EXAMPLES = 96
EPOCHS = 2
NUM_STEPS = 8
SEED = 3

#: name -> (global batch size, optimizer, learning rate, teacher forcing ratio). "adam" is fit's
#: default optimizer (Adam is nearly invariant to the gradient's scale); "sgd" with small
#: batches, whose gradient norms are mostly below the clipping threshold 1, makes the update
#: proportional to the gradient, so a wrongly scaled gradient changes the result; "tf" trains
#: the step-by-step decoder (every rank and the single process draw the same coins: the same
#: seed and as many batches).
CONFIGS = {"adam": (16, None, 0.01, 1.0), "sgd": (4, "sgd", 0.1, 1.0), "tf": (16, None, 0.01, 0.5)}


def build():
    """(dataset, tgt_vocab, net): the first NUM_EXAMPLES training pairs of the numbers corpus
    and a seeded model without dropout (dropout masks would differ between the ranks and one
    process)."""
    train_iter, src_vocab, tgt_vocab, _ = load_data_numbers(16, NUM_STEPS, num_held_out=10,
                                                            seed=0, stop=300)
    dataset = tdata.TensorDataset(*[t[:NUM_EXAMPLES] for t in train_iter.dataset.tensors])
    torch.manual_seed(SEED)
    net = EncoderDecoder(Seq2SeqEncoder(len(src_vocab), 8, 16, 2),
                         Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2))
    return dataset, tgt_vocab, net


def train(loader, tgt_vocab, net, config):
    """fit for EPOCHS epochs with ``config``; returns (per-epoch losses, final parameters)."""
    _, opt, lr, ratio = CONFIGS[config]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr) if opt == "sgd" else None
    losses = []
    torch.manual_seed(SEED + 1)  # the Xavier initialisation draws from here
    random.seed(SEED)  # the teacher-forcing coins
    fit(net, loader, lr, EPOCHS, tgt_vocab, torch.device("cpu"), plot=False,
        optimizer=optimizer, teacher_forcing_ratio=ratio,
        on_epoch=lambda epoch, loss, speed: losses.append(loss))
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_single(config):
    """The same training in one process over the same global batches (no shuffling)."""
    dataset, tgt_vocab, net = build()
    loader = tdata.DataLoader(dataset, batch_size=CONFIGS[config][0], shuffle=False)
    return train(loader, tgt_vocab, net, config)


def main(out_dir):
    torch.set_num_threads(1)
    if not distributed.init_from_env():
        raise SystemExit("dist_worker.py: run it under torchrun")
    try:
        results = {"world_size": distributed.world_size(), "rank": distributed.rank()}
        for config, (batch, *_) in CONFIGS.items():
            dataset, tgt_vocab, net = build()
            if distributed.rank() != 0:
                # other starting weights off rank 0 (embeddings and biases keep the offset
                # through the Xavier initialisation): DDP must broadcast rank 0's weights
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(1.0)
            loader = distributed.shard_loader(dataset, batch, shuffle=False)
            losses, params = train(loader, tgt_vocab, net, config)
            results[config] = {"losses": losses, "params": params, "batches": len(loader),
                               "local_batch": loader.batch_size}
        torch.save(results, os.path.join(out_dir, f"rank{distributed.rank()}.pt"))
        distributed.barrier()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
