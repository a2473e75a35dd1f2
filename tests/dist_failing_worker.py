"""Worker for tests/test_distributed.py, launched by ``torchrun``: the CLI's ``train`` on the
built-in corpus, in which rank 1 raises at its 20th optimizer step (a failure in the middle of
an epoch, while rank 0 waits in DDP's all-reduce). ``OUT_DIR`` receives the checkpoint."""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seq2seq_ext import cli, training  # noqa: E402

_clip = training._clip_and_step  # fit's clipping and optimizer step, once a step
_steps = [0]


def _failing_clip(net, theta, optimizer):
    _steps[0] += 1
    if os.environ.get("RANK") == "1" and _steps[0] == 20:
        raise RuntimeError("simulated failure on rank 1")
    return _clip(net, theta, optimizer)


if __name__ == "__main__":
    training._clip_and_step = _failing_clip
    out = sys.argv[-1]
    sys.exit(cli.main(["train", "--epochs", "50", "--num-hiddens", "8", "--embed-size", "8",
                       "--no-progress", "--plot", "", "--overwrite",
                       "--checkpoint", os.path.join(out, "model.pt")]))
