"""The decoder's GRU layers skip the padding (see ``seq2seq_ext.bench.padding_skip``): one
training step over every position against the packed layout, beside the reference's."""
import sys

from seq2seq_ext.bench.padding_skip import main

if __name__ == "__main__":
    sys.exit(main())
