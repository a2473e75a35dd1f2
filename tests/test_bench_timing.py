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


class _Clock:
    """perf_counter stand-in: each function advances it by the next of its own durations."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def runner(self, durations):
        durations = iter(durations)

        def run():
            self.now += next(durations)
        return run


def test_median_of_an_even_number_of_rounds_is_the_middle_two_values_mean(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    t = common.interleaved({"a": clock.runner([1.0, 3.0]), "b": clock.runner([2.0, 6.0])},
                           repeat=2, warmup=0)
    assert t == {"a": 2.0, "b": 4.0}
    assert common.median_time(clock.runner([0.0, 5.0, 1.0, 2.0, 9.0]), repeat=4) == 3.5


def test_loss_floor_counts_only_the_logits_within_valid_lengths():
    from pytest import approx
    from seq2seq_ext.bench.compare import ce_floor
    n = 1 << 16
    for kept in (n, n // 2, 0):
        f = ce_floor(n, kept)
        assert f["kept_share"] == kept / n
        # two exps per kept logit; the kept logits read twice and the whole gradient written
        assert f["exp_floor_s"] * f["exp_per_ns"] * 1e9 == approx(2 * kept)
        assert f["bytes_floor_s"] * f["bandwidth_gbs"] * 1e9 == approx(4 * (2 * kept + n))
        assert f["floor_s"] == max(f["exp_floor_s"], f["bytes_floor_s"])
