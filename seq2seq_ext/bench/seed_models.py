"""The per-step teacher-forcing seq2seq that most PyTorch tutorials train (the project's seed
documents 003 and 004): a ``batch_first`` recurrent encoder and a decoder called once per target
step in a Python loop, the next input chosen by a coin (``teacher_forcing_ratio``) between the
target token and the model's own argmax, ``nn.CrossEntropyLoss`` over the flattened outputs and
``clip_grad_norm_``.

Written as a user would (plain ``torch.nn``, nothing from this package), so that the benchmarks
and tests can run it as is and through ``seq2seq_ext.accelerate``. ``cell`` picks ``nn.LSTM``
(the seeds') or ``nn.GRU``.
"""
import random

import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, vocab, embed, hidden, layers, dropout, cell="lstm"):
        super().__init__()
        self.cell = cell
        self.embedding = nn.Embedding(vocab, embed)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed, hidden, layers, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src):
        _, state = self.rnn(self.dropout(self.embedding(src)))
        return state


class Decoder(nn.Module):
    def __init__(self, vocab, embed, hidden, layers, dropout, cell="lstm"):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed, hidden, layers, dropout=dropout, batch_first=True)
        self.fc_out = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(dropout)

    def forward(self, token, state):
        """token (batch,), state h or (h, c) -> (logits (batch, vocab), new state)."""
        embedded = self.dropout(self.embedding(token.unsqueeze(1)))
        output, state = self.rnn(embedded, state)
        return self.fc_out(output.squeeze(1)), state


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab, tgt_vocab, embed, hidden, layers, dropout, cell="lstm"):
        super().__init__()
        self.encoder = Encoder(src_vocab, embed, hidden, layers, dropout, cell)
        self.decoder = Decoder(tgt_vocab, embed, hidden, layers, dropout, cell)

    def forward(self, src, trg, teacher_forcing_ratio=0.5, coins=None):
        """The seeds' loop; ``coins`` (a random.Random) draws the teacher-forcing coins, so that
        two models can be fed the same ones."""
        coins = coins or random
        batch, steps = trg.shape
        outputs = []
        state = self.encoder(src)
        token = trg[:, 0]
        for t in range(1, steps):
            logits, state = self.decoder(token, state)
            outputs.append(logits)
            token = trg[:, t] if coins.random() < teacher_forcing_ratio else logits.argmax(1)
        return torch.stack(outputs, dim=1)  # (batch, steps - 1, vocab)


def train_step(model, optimizer, src, trg, coins=None, clip=1.0, teacher_forcing_ratio=0.5,
               amp=False):
    """One step of the seeds' training: loss over the flattened outputs, clipped gradients;
    ``amp``: the forward pass and the loss under CPU autocast to bfloat16."""
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        output = model(src, trg, teacher_forcing_ratio, coins)
        loss = nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]),
                                           trg[:, 1:].reshape(-1))
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()


def batch(batch_size, steps, src_vocab, tgt_vocab, seed=0):
    """Random token batches (ids from 1), as the seeds' dummy data."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, src_vocab, (batch_size, steps), generator=g),
            torch.randint(1, tgt_vocab, (batch_size, steps), generator=g))
