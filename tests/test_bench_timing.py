"""The benchmarks' interleaved timers (seq2seq_ext.bench.common.interleaved and paired_times):
every function runs once per round, and the order reverses every other round, so that no side
always runs on the caches another left."""
from seq2seq_ext.bench import common


def recorder(calls, name):
    return lambda: calls.append(name)


def test_paired_times_alternates_the_order():
    calls = []
    t = common.paired_times(recorder(calls, "ref"), recorder(calls, "ext"), repeat=4, warmup=1)
    assert calls == ["ref", "ext", "ref", "ext", "ext", "ref", "ref", "ext", "ext", "ref"]
    assert len(t) == 2 and all(v >= 0 for v in t)


def test_interleaved_alternates_the_order():
    calls = []
    t = common.interleaved({k: recorder(calls, k) for k in "abc"}, repeat=3)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert set(t) == set("abc")


def test_paired_times_counts_number_calls_a_round():
    calls = []
    t = common.paired_times(recorder(calls, "ref"), recorder(calls, "ext"), repeat=2, number=3,
                            warmup=0)
    assert calls == ["ref"] * 3 + ["ext"] * 3 + ["ext"] * 3 + ["ref"] * 3
    assert len(t) == 2


def test_interleaved_without_warmup():
    calls = []
    common.interleaved({k: recorder(calls, k) for k in "ab"}, repeat=2, warmup=0)
    assert calls == list("abba")
