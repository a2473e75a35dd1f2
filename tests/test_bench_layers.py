"""benchmarks/layers.py (seq2seq_ext.bench.layers): the drop-in layers alone, timed against
plain nn.GRU / nn.LSTM; at tiny sizes, so that a change that breaks the script fails here."""
import pytest

from seq2seq_ext import _C, ops
from seq2seq_ext.bench import layers


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_times_every_part_of_both_models(cell):
    t = layers.layer_times(cell, 3, 2, 5, 4, amp=False, repeat=2)
    assert set(t) == {(part, k) for part in ("forward", "forward+backward")
                      for k in ("plain", "accelerated")}
    assert all(v > 0 for v in t.values())


def test_table_has_a_row_per_size_and_dtype(capsys):
    assert layers.main(["--sizes", "2,3,5,4", "3,1,4,8", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| GRU (")]
    assert len(rows) == 4
    assert sum("bf16 autocast" in r for r in rows) == 2 and all(r.count("x**") == 2 for r in rows)


@pytest.mark.parametrize("bad", ["2,3,5", "2,3,x,4", "0,3,5,4"])
def test_bad_sizes_name_the_argument(bad, capsys):
    with pytest.raises(SystemExit):
        layers.main(["--sizes", bad])
    assert "--sizes" in capsys.readouterr().err


@pytest.mark.skipif(not _C.mkl_packed_usable(), reason="needs PyTorch built with MKL")
def test_mkl_packed_table_and_the_switch_restored(capsys):
    was = ops.mkl_packed_products()
    assert layers.main(["--mkl-packed", "--sizes", "5,4,8,64", "--repeat", "1"]) == 0
    assert ops.mkl_packed_products() == was
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| GRU (")]
    assert len(rows) == 1 and rows[0].count("x**") == 2
