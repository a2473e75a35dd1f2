"""Loss curves and held-out BLEU, float32 against bf16 autocast (see
``seq2seq_ext.bench.bf16_convergence``)."""
import sys

from seq2seq_ext.bench.bf16_convergence import main

if __name__ == "__main__":
    sys.exit(main())
