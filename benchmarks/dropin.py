"""The drop-in layers on programs the package did not write (see
``seq2seq_ext.bench.dropin``): plain PyTorch, accelerated, ``torch.compile``, and the ceiling."""
import sys

from seq2seq_ext.bench.dropin import main

if __name__ == "__main__":
    sys.exit(main())
