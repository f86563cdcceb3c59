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
    """An empty table, the kernels' own spaces (registered on import) and the test's,
    which go at its end, a private cache folder."""
    from tensorc.backends.llvm import attention, codegen, gemm, loop_tuning  # noqa: F401
    monkeypatch.setenv("TENSORC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TENSORC_TUNE_CACHE", raising=False)
    monkeypatch.setattr(tuning, "SPACES", dict(tuning.SPACES))
    new_process(monkeypatch)


def new_process(monkeypatch):
    """The tuner's state as a new process has it: nothing read yet."""
    for name in ("_tuned", "_times"):
        monkeypatch.setattr(tuning, name, {})
    for name in ("_unchecked", "_rejected"):
        monkeypatch.setattr(tuning, name, set())
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


def test_no_final_check_when_every_candidate_is_clearly_slower():
    fake = Fake([1.0, 2.0, 3.0])
    tuning.register(fake.space)
    [r] = tuning.tune([("fake", (1,))], budget_s=1.0)
    assert r.chosen == r.default and r.done and r.tried == 2
    assert fake.calls == [(0, 3), (1, 1), (2, 1)]   # the default, then one timing each


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
    assert elapsed < 0.3 + 0.1   # one measure call's overrun at most, and some slack
    assert r.tried < 2000 and r.candidates == 2000
    assert len({n for n, _ in fake.calls}) < 2000


def test_an_item_the_budget_cuts_short_is_not_cached_as_a_verdict():
    fake = Fake([1.0, 0.5], sleep=0.05)   # timing the default alone spends the budget
    tuning.register(fake.space)
    [r] = tuning.tune([("fake", (1,))], budget_s=0.1)
    assert r.chosen == r.default and not r.done and "timed 0 of 1" in r.note
    assert not tuning.tuned("fake", (1,)) and not tuning.cache_path().exists()


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
    new_process(monkeypatch)   # which reads the file lazily
    assert tuning.schedule("fake", (4, "pa")) == {"n": 1}
    new_process(monkeypatch)
    monkeypatch.setenv("TENSORC_TUNE_CACHE", "off")   # the untuned column
    assert tuning.schedule("fake", (4, "pa")) == {"n": 0}


def test_saving_keeps_what_another_process_saved(monkeypatch):
    tuning.register(Fake([1.0, 0.5]).space)
    tuning.tune([("fake", (1,))], budget_s=0.3)
    new_process(monkeypatch)   # another one, which tunes another key
    tuning.tune([("fake", (2,))], budget_s=0.3)
    keys = [e["key"] for e in json.loads(tuning.cache_path().read_text())["entries"]]
    assert keys == [[1], [2]]


def test_a_broken_space_does_not_stop_the_others():
    def candidates(key):
        raise RuntimeError("broken")
    tuning.register(tuning.Space("broken", lambda key: {"n": 0}, candidates,
                                 lambda key, s, repeat: 1.0))
    tuning.register(Fake([1.0, 0.5]).space)
    results = tuning.tune([("broken", (1,)), ("fake", (1,))], budget_s=0.5)
    assert {r.kernel: r.chosen for r in results} == {"broken": {"n": 0}, "fake": {"n": 1}}
    assert "broken" in next(r.note for r in results if r.kernel == "broken")


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
    assert not tuning.tuned("fake", (1,))   # searched again by the next tune
    tuning.save()   # and gone from the file
    assert [e["key"] for e in json.loads(tuning.cache_path().read_text())["entries"]] == [[2]]


def test_the_table_holds_schedules_as_the_contract_says(monkeypatch):
    tuning.register(Fake([1.0, 0.5, 0.7]).space)
    monkeypatch.setitem(tuning._tuned, ("fake", (3,)), {"n": 2})   # as the kernels' tests do
    assert tuning.schedule("fake", (3,)) == {"n": 2}


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


# --- what a model uses: the runtime's matmul binder asks a fake space, as the GEMM does ---

@pytest.fixture
def fake_gemm(monkeypatch):
    """Every llvm matmul bind asks "fakegemm" for a schedule at its output shape (as a
    kernel's bind asks `tuning.schedule`); `bound` logs the answers. The kernels' own
    spaces offer their default only: their timings would make the tests' outcomes noisy."""
    from tensorc.backends.llvm import runtime
    for name, space in tuning.SPACES.items():
        monkeypatch.setitem(tuning.SPACES, name, tuning.Space(
            name, space.default, lambda key, d=space.default: [d(key)], space.measure))
    fake = Fake([1.0, 0.6, 0.8], name="fakegemm")
    tuning.register(fake.space)
    inner, fake.bound = runtime.LIBRARY["matmul"], []

    def binder(attrs, ins, outs, epilogue, threads):
        fake.bound.append(tuning.schedule("fakegemm", tuple(outs[0].shape)))
        return inner(attrs, ins, outs, epilogue, threads)
    monkeypatch.setitem(runtime.LIBRARY, "matmul", binder)
    return fake


def _matmul_graph():
    import tensorc
    return tensorc.trace(lambda a, b: a @ b, a=tensorc.TensorSpec(("batch", 8), "f32"),
                         b=np.ones((8, 4), np.float32))


def test_tune_env_tunes_on_the_first_call_of_each_shape(fake_gemm, monkeypatch):
    import tensorc
    monkeypatch.setenv("TENSORC_TUNE", "1")
    monkeypatch.setenv("TENSORC_TUNE_BUDGET", "0.5")
    exe = tensorc.compile(_matmul_graph(), "llvm")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 8), np.float32), rng.standard_normal((8, 4), np.float32)
    first, second = exe(a, b), exe(a, b)
    # bound with the default, tuned, bound again with the winner; the results agree
    assert fake_gemm.bound == [{"n": 0}, {"n": 1}]
    np.testing.assert_allclose(first, a @ b, rtol=1e-5)
    np.testing.assert_array_equal(first, second)
    assert tuning.tuned("fakegemm", (3, 4)) and tuning.cache_path().exists()
    exe(np.ones((5, 8), np.float32), b)   # a new shape set: tuned in turn
    assert tuning.tuned("fakegemm", (5, 4))
    monkeypatch.delenv("TENSORC_TUNE")   # a later compile reads the table, tunes nothing
    fake_gemm.bound.clear()
    tensorc.compile(_matmul_graph(), "llvm")(a, b)
    assert fake_gemm.bound == [{"n": 1}]


def test_api_tune_reports_and_later_compiles_use_it(fake_gemm):
    import tensorc
    inputs = {"a": np.ones((2, 8), np.float32), "b": np.ones((8, 4), np.float32)}
    report = tensorc.tune(_matmul_graph(), inputs, budget=0.5, repeat=2, min_seconds=0)
    [k] = [k for k in report["kernels"] if k["kernel"] == "fakegemm"]
    assert k["key"] == [2, 4] and k["chosen"] == {"n": 1}
    assert k["gain"] == pytest.approx(1 / 0.6) and report["changed"] == 1
    assert report["latency_ms"]["untuned"] > 0 and report["latency_ms"]["tuned"] > 0
    assert fake_gemm.bound == [{"n": 0}, {"n": 1}]   # untuned baseline, then tuned
    with pytest.raises(tensorc.TensorcError, match="budget"):
        tensorc.tune(_matmul_graph(), inputs, budget=0)


def test_cli_tune_a_tiny_gpt(fake_gemm, capsys):
    from tensorc.cli import main
    assert main(["tune", "gpt", "--budget", "2", "--seq", "8", "--format", "json",
                 "--repeat", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours = [k for k in report["kernels"] if k["kernel"] == "fakegemm"]
    assert report["model"] == "gpt" and ours and all(k["chosen"] == {"n": 1} for k in ours)
    assert all(k["chosen"] == k["default"] for k in report["kernels"] if k not in ours)
    assert report["search_s"] < 2 + 0.5
    assert main(["tune", "--show", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted(e["key"] for e in shown["entries"] if e["kernel"] == "fakegemm") \
        == sorted(k["key"] for k in ours)
    assert main(["tune", "--show"]) == 0
    assert "fakegemm" in capsys.readouterr().out
    assert main(["tune", "--clear"]) == 0 and not tuning.cache_path().exists()


@pytest.mark.parametrize("argv, message", [
    (["tune", "nosuchmodel"], "unknown model"),
    (["tune", "gpt", "--budget", "0"], "--budget"),
    (["tune", "gpt", "--budget", "-3"], "--budget"),
    (["tune", "gpt", "--backend", "numpy"], "llvm"),
    (["tune"], "needs a MODEL"),
    (["tune", "gpt", "--show"], "takes no MODEL"),
])
def test_cli_tune_bad_input(capsys, argv, message):
    from tensorc.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorc: error:") and message in err and err.count("\n") == 1


# --- the real spaces: a tuned schedule computes what the default does --------------------

def test_tuned_gemm_schedules_agree_with_the_default(monkeypatch):
    """Each GEMM key a small MLP-like graph binds, forced to other candidates: the
    results stay within float32 rounding of the default's (a K blocking changes the
    order of the sums; docs/tuning.md) and of float64 numpy."""
    from tensorc.backends.llvm import LLVMExecutable
    if "gemm" not in tuning.SPACES:
        pytest.skip("no GEMM schedule space registered")
    import tensorc
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((96, 200), np.float32) / 10
    w2 = rng.standard_normal((200, 64), np.float32) / 10
    graph = tensorc.trace(lambda x, w: (x @ w1) @ w2 + x @ w, x=tensorc.TensorSpec(
        (37, 96), "f32"), w=rng.standard_normal((96, 64), np.float32))
    x, w = rng.standard_normal((37, 96), np.float32), rng.standard_normal((96, 64),
                                                                           np.float32)
    want = (x.astype(np.float64) @ w1 @ w2 + x.astype(np.float64) @ w)
    with tuning.record() as seen:
        default = LLVMExecutable(graph)(x, w)
    keys = [key for kernel, key in seen if kernel == "gemm"]
    assert keys
    space = tuning.SPACES["gemm"]
    for i in range(1, 4):   # the i-th candidate of every key at once
        for key in keys:
            cands = space.candidates(key)
            monkeypatch.setitem(tuning._tuned, ("gemm", key), cands[i % len(cands)])
        got = LLVMExecutable(graph)(x, w)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, default, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
