"""The drop-in recurrent layers alone over a sequence (see ``seq2seq_ext.bench.layers``): plain
``nn.GRU`` / ``nn.LSTM`` against the same module accelerated, forward and forward + backward."""
import sys

from seq2seq_ext.bench.layers import main

if __name__ == "__main__":
    sys.exit(main())
