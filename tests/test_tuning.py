"""The autotuner (backends/llvm/tuning.py): search, per-host cache, record(), the
`tensorc tune` command and TENSORC_TUNE=1, on fake spaces whose timings are known."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from tensorc.backends.llvm import jit, tuning


class Fake:
    """A kernel whose schedule {"n": i} costs `costs[i]` seconds a call (reported, not
    slept: the search is deterministic), each measure sleeping `sleep` seconds a repeat."""

    def __init__(self, costs, name="fake", sleep=0.0, raises=()):
        self.costs, self.sleep, self.raises, self.calls = costs, sleep, set(raises), []
        self.space = tuning.Space(name, lambda key: {"n": 0},
                                  lambda key: [{"n": i} for i in range(len(self.costs))],
                                  self.measure)

    def measure(self, key, s, repeat):
        self.calls.append((s["n"], repeat))
        if s["n"] in self.raises:
            raise RuntimeError(f"no kernel for n={s['n']}")
        time.sleep(self.sleep * repeat)
        return self.costs[s["n"]] * key[0]


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """An empty table, no spaces but the test's, a private cache folder."""
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TENSORC_TUNE_CACHE", raising=False)
    monkeypatch.setattr(tuning, "SPACES", dict(tuning.SPACES))
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_loaded", False)


def test_search_picks_the_truly_faster_candidate():
    fake = Fake([1.0, 0.9, 1.2, 0.5, 0.95, 1.1])
    tuning.register(fake.space)
    [r] = tuning.tune([("fake", (1,))], budget_s=1.0)
    assert r.chosen == {"n": 3} and r.default == {"n": 0}
    assert r.tuned_s == pytest.approx(0.5) and r.default_s == pytest.approx(1.0)
    assert r.gain == pytest.approx(2.0)
    assert tuning.schedule("fake", (1,)) == {"n": 3}
    assert tuning.schedule("fake", (2,)) == {"n": 0}   # another key: still the default


def test_default_kept_when_nothing_beats_it_by_the_margin():
    fake = Fake([1.0, 0.99, 0.985, 1.5])   # 1.5 % faster at best: noise
    tuning.register(fake.space)
    [r] = tuning.tune([("fake", (1,))], budget_s=1.0)
    assert r.chosen == r.default == {"n": 0} and r.gain == 1.0
    assert tuning.tuned("fake", (1,)) and tuning.schedule("fake", (1,)) == {"n": 0}


def test_a_raising_candidate_is_dropped_with_its_reason():
    fake = Fake([1.0, 0.1, 0.7], raises={1})
    tuning.register(fake.space)
    [r] = tuning.tune([("fake", (1,))], budget_s=1.0)
    assert r.chosen == {"n": 2}
    assert len(r.dropped) == 1 and "no kernel for n=1" in r.dropped[0]


def test_search_stays_within_the_budget_and_is_not_exhaustive():
    fake = Fake([1.0] + [0.9] * 2000, sleep=0.002)
    tuning.register(fake.space)
    t = time.perf_counter()
    [r] = tuning.tune([("fake", (1,))], budget_s=0.3)
    elapsed = time.perf_counter() - t
    assert elapsed < 0.3 + 0.05   # one measure call's overrun at most, and some slack
    assert r.tried < 2000 and r.candidates == 2001
    assert len({n for n, _ in fake.calls}) < 2000


def test_budget_is_split_by_the_defaults_time():
    slow, quick = Fake([1.0] * 400, "slow", sleep=0.01), Fake([1.0] * 400, "quick",
                                                                sleep=0.01)
    slow.costs = [c * 10 for c in slow.costs]
    tuning.register(slow.space)
    tuning.register(quick.space)
    results = tuning.tune([("quick", (1,)), ("slow", (1,))], budget_s=0.5)
    assert [r.kernel for r in results] == ["slow", "quick"]   # the heavier first
    assert results[0].tried > 2 * results[1].tried


def test_cache_round_trip_and_other_processes_read_it(monkeypatch):
    tuning.register(Fake([1.0, 0.5]).space)
    tuning.tune([("fake", (4, "pa"))], budget_s=0.5)
    data = json.loads(tuning.cache_path().read_text())
    assert data["host"]["cpu"] == jit.target().cpu
    [entry] = data["entries"]
    assert entry["key"] == [4, "pa"] and entry["schedule"] == {"n": 1}
    assert entry["seconds"] == pytest.approx(2.0) and entry["default_seconds"] == 4.0
    monkeypatch.setattr(tuning, "_tuned", {})   # a new process: read lazily
    monkeypatch.setattr(tuning, "_loaded", False)
    assert tuning.schedule("fake", (4, "pa")) == {"n": 1}
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    monkeypatch.setenv("TENSORC_TUNE_CACHE", "off")   # the untuned column
    assert tuning.schedule("fake", (4, "pa")) == {"n": 0}


def _write_cache(text):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cached_schedule_that_is_not_a_candidate_is_ignored(caplog):
    tuning.register(Fake([1.0, 0.5]).space)
    entry = {"kernel": "fake", "key": [1], "seconds": 1, "default_seconds": 2}
    _write_cache(json.dumps({"format": 1, "host": {}, "entries": [
        {**entry, "schedule": {"n": 99}}, {**entry, "key": [2], "schedule": {"n": 1}}]}))
    with caplog.at_level(logging.WARNING, "tensorc"):
        assert tuning.schedule("fake", (1,)) == {"n": 0}
    assert "not a candidate" in caplog.text
    assert tuning.schedule("fake", (2,)) == {"n": 1}


@pytest.mark.parametrize("text", ["{not json", '{"format": 1, "entries": [{"kernel": 3}]}',
                                  '{"format": 7, "entries": []}', "[]"])
def test_a_corrupt_cache_is_ignored_with_a_warning(caplog, text):
    tuning.register(Fake([1.0, 0.5]).space)
    _write_cache(text)
    with caplog.at_level(logging.WARNING, "tensorc"):
        assert tuning.schedule("fake", (1,)) == {"n": 0}
    [record] = caplog.records
    assert "ignoring the tuning cache" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_the_cache_file_is_per_host(monkeypatch):
    here = tuning.cache_path()
    monkeypatch.setattr(jit.target(), "fingerprint", jit.target().fingerprint + "+avx512f")
    assert tuning.cache_path() != here and tuning.cache_path().parent == here.parent


def test_record_collects_what_is_asked_and_defaults_ignores_the_table():
    tuning.register(Fake([1.0, 0.5]).space)
    with tuning.record() as seen:
        tuning.schedule("fake", (1,))
        with tuning.record() as inner:
            tuning.schedule("fake", (2, "x"))
    assert seen == {("fake", (1,)), ("fake", (2, "x"))} and inner == {("fake", (2, "x"))}
    tuning.tune([("fake", (1,))], budget_s=0.5)
    with tuning.defaults():
        assert tuning.schedule("fake", (1,)) == {"n": 0}
    assert tuning.schedule("fake", (1,)) == {"n": 1}


def test_clear_forgets_the_table():
    tuning.register(Fake([1.0, 0.5]).space)
    tuning.tune([("fake", (1,))], budget_s=0.5)
    assert tuning.cache_path().exists() and tuning.entries()
    tuning.clear()
    assert not tuning.cache_path().exists() and not tuning.entries()
    assert tuning.schedule("fake", (1,)) == {"n": 0}


def test_budget_from_env(monkeypatch):
    from tensorc.errors import TensorcError
    monkeypatch.setenv("TENSORC_TUNE_BUDGET", "2.5")
    assert tuning.budget_from_env() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("TENSORC_TUNE_BUDGET", bad)
        with pytest.raises(TensorcError, match="TENSORC_TUNE_BUDGET"):
            tuning.budget_from_env()
