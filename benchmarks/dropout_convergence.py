"""Loss curves with dropout, plain PyTorch against the drop-in layers (see
``seq2seq_ext.bench.dropout_convergence``)."""
import sys

from seq2seq_ext.bench.dropout_convergence import main

if __name__ == "__main__":
    sys.exit(main())
