"""The decoder's GRU layers skip the padding: one training step of the chapter's model (the
package's ``fit`` step: forward, loss, backward, clipping, Adam) on fra-eng batches, with the
decoder's layers run over every position (``rows``: only the output projection and the loss
skip the padded positions) against the packed layout (``packed``: the layers skip them too),
interleaved in one process, beside the reference's own step (d2l's ``train_seq2seq`` body on
the reference backend).

``seq2seq-ext``'s fit takes the packed path on the CPU; the other two are what it did before
and what the chapter does. The table gives the median milliseconds per batch over the same
batches and the share of decoder positions that are padding.
"""
import argparse
import statistics
import time

import torch

import seq2seq_ext as d2l
from seq2seq_ext import ops, reference as R, training
from seq2seq_ext.bench import common

CONFIGS = {
    "chapter": dict(num_examples=600, embed=32, hidden=32, layers=2, batch=64, steps=10),
    "large": dict(num_examples=20000, embed=256, hidden=512, layers=2, batch=128, steps=12),
}


def _models(cfg, src_vocab, tgt_vocab, mod):
    torch.manual_seed(0)
    net = mod.EncoderDecoder(
        mod.Seq2SeqEncoder(len(src_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1),
        mod.Seq2SeqDecoder(len(tgt_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1))
    net.apply(R.xavier_init_weights)
    return net.train()


def step_fn(variant, net, tgt_vocab):
    """One training step on a batch, as ``fit`` (``rows`` / ``packed``) or the reference runs
    it."""
    opt = torch.optim.Adam(net.parameters(), lr=0.005)
    bos_id = tgt_vocab['<bos>']
    if variant == "reference":
        loss = R.MaskedSoftmaxCELoss()

        def step(batch):
            X, X_valid_len, Y, Y_valid_len = batch
            opt.zero_grad()
            bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype)
            Y_hat, _ = net(X, torch.cat([bos, Y[:, :-1]], 1), X_valid_len)
            loss(Y_hat, Y, Y_valid_len).sum().backward()
            R.grad_clipping(net, 1)
            opt.step()
        return step
    model = training._TrainForward(net, 1.0, d2l.MaskedSoftmaxCELoss())

    def step(batch):
        X, X_valid_len, Y, Y_valid_len = batch
        opt.zero_grad()
        kept = training._kept_positions(Y_valid_len, *Y.shape, packed=variant == "packed")
        bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype)
        l = model(X, torch.cat([bos, Y[:, :-1]], 1), X_valid_len, Y, Y_valid_len, kept)
        l.sum().backward()
        d2l.grad_clipping(net, 1)
        opt.step()
    return step


def run(config="chapter", batches=8, rounds=3, threads=1):
    """{variant: median ms per batch}, the padding share and the sizes."""
    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    data_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(cfg["batch"], cfg["steps"],
                                                        cfg["num_examples"], path=common.FRA_ENG)
    data = list(data_iter)[:batches]
    kept = sum(int(b[3].clamp(max=cfg["steps"]).sum()) for b in data)
    positions = sum(b[2].numel() for b in data)
    steps = {}
    for variant in ("reference", "rows", "packed"):
        net = _models(cfg, src_vocab, tgt_vocab, R if variant == "reference" else d2l)
        steps[variant] = step_fn(variant, net, tgt_vocab)
    times = {v: [] for v in steps}
    for r in range(rounds + 1):  # the first round warms up
        for variant, step in steps.items():
            with ops.use_backend("reference" if variant == "reference" else "ext"):
                for batch in data:
                    t0 = time.perf_counter()
                    step(batch)
                    if r:
                        times[variant].append(time.perf_counter() - t0)
    return ({v: 1e3 * statistics.median(t) for v, t in times.items()},
            1 - kept / positions, dict(cfg, tgt_vocab=len(tgt_vocab)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), nargs="*", default=list(CONFIGS))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print("| config | padding | reference ms | rows ms | packed ms | packed vs rows "
          "| packed vs reference |")
    print("|---|---|---|---|---|---|---|")
    for name in args.config:
        ms, pad, cfg = run(name, args.batches, args.rounds, args.threads)
        print(f"| {name} (embed {cfg['embed']}, hidden {cfg['hidden']}, batch {cfg['batch']}, "
              f"{cfg['steps']} steps, vocab {cfg['tgt_vocab']}) | {100 * pad:.0f}% "
              f"| {ms['reference']:.1f} | {ms['rows']:.1f} | {ms['packed']:.1f} "
              f"| {ms['rows'] / ms['packed']:.2f}x | {ms['reference'] / ms['packed']:.2f}x |",
              flush=True)
    return 0
