"""Reference vs extension, side by side in one process: the ratio table (see
``seq2seq_ext.bench.compare``; ``seq2seq-ext bench`` runs the same)."""
import sys

from seq2seq_ext.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
