"""Translation one sentence at a time at embed/hidden 256 (see
``seq2seq_ext.bench.translate_large``): the reference's loop, the package's greedy loop with
float32 and with bfloat16 weights, and the memory-bandwidth floor."""
import sys

from seq2seq_ext.bench.translate_large import main

if __name__ == "__main__":
    sys.exit(main())
