"""The flash-attention kernel's schedule space (backends/llvm/attention_schedule.py):
every candidate against the float64 definition, the default against today's kernel
bit for bit, and the space's keys and candidates."""

import json
import math

import numpy as np
import pytest
from test_llvm_attention import naive  # the float64 definition, one home

from tensorc.backends.llvm import attention as A
from tensorc.backends.llvm import attention_schedule as S
from tensorc.backends.llvm import tuning
from tensorc.errors import TensorcError

TODAY = {"path": "flash", "br": 8, "bc": 32}   # the hand-picked kernel before the space


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    err = np.abs(got - want)[ok].max(initial=0) / max(np.abs(want)[ok].max(initial=0), 1e-30)
    assert err <= tol, f"relative error {err:.2e}"


def operands(rng, b, h, t, s, d, dv, kind):
    q, k = rng.standard_normal((b, h, t, d), np.float32), rng.standard_normal((b, h, s, d),
                                                                              np.float32)
    v = rng.standard_normal((b, h, s, dv), np.float32)
    mask = None if kind == "none" else rng.random((b, 1, t, s)) > 0.3 if kind == "keep" \
        else rng.standard_normal((1, h, t, s), np.float32)
    return q, k, v, mask


# b, h, t, s, d, dv: t and s off every tile (4, 6, 8, 12 rows; 16, 32 keys), a few
# decode rows, and t = 13, whose candidates are every tile and every decode group
SHAPES = [(2, 3, 45, 70, 33, 17), (1, 2, 13, 37, 20, 40), (1, 1, 3, 50, 64, 64),
          (1, 2, 29, 9, 16, 16)]


@pytest.mark.parametrize("kind", ["none", "keep", "add"])
def test_every_candidate_matches_the_reference(kind):
    rng = np.random.default_rng({"none": 1, "keep": 2, "add": 3}[kind])
    tried = set()
    for i, shape in enumerate(SHAPES):
        q, k, v, mask = operands(rng, *shape, kind)
        for causal, mv in ((False, -math.inf), (True, -math.inf), (True, -1e9)):
            want = naive(q, k, v, mask, 0.3, causal, mv)
            b, h, t, s, d, dv = shape
            for sched in S.candidates(S.key(b * h, t, s, d, dv, causal, kind)):
                got = A.attention(q, k, v, mask, 0.3, causal, mv, threads=1 + i % 2,
                                  schedule=sched)
                assert_close(got, want)
                tried.add(json.dumps(sched, sort_keys=True))
    every = {json.dumps(c, sort_keys=True) for c in S.candidates((1, 13, 64, 8, 8, 0, kind))}
    assert every <= tried and len(every) == len(S.TILES) + len(S.GROUPS)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_default_is_todays_kernel_bit_for_bit(threads):
    """Block rows leave each score's and each output's sums in the same order, so the
    default (8 x 32 blocks, 4 x 32 without AVX-512) is today's 8 x 32 to the bit."""
    rng = np.random.default_rng(5)
    for shape, kind, causal in [((2, 3, 45, 70, 33, 17), "keep", True),
                                ((1, 8, 128, 128, 64, 64), "none", True),
                                ((1, 2, 29, 300, 64, 80), "add", False)]:
        q, k, v, mask = operands(rng, *shape, kind)
        with tuning.defaults():   # not what this host's tuning cache may hold
            got = A.attention(q, k, v, mask, 0.125, causal, threads=threads)
        today = A.attention(q, k, v, mask, 0.125, causal, threads=threads, schedule=TODAY)
        np.testing.assert_array_equal(got.view(np.uint32), today.view(np.uint32))


def test_the_default_schedule_per_host(monkeypatch):
    key = S.key(8, 128, 128, 64, 64, True, "none")
    monkeypatch.setattr(S, "_wide", lambda: True)
    assert S.default(key) == TODAY
    assert S.candidates(key)[1]["br"] * S.candidates(key)[1]["bc"] >= 256   # big tiles first
    monkeypatch.setattr(S, "_wide", lambda: False)
    assert S.default(key) == {"path": "flash", "br": 4, "bc": 32}
    assert S.default(S.key(8, 4, 100, 64, 64, True, "none")) == {"path": "decode", "group": 4}
    assert S.default(S.key(8, 5, 100, 64, 64, True, "none"))["path"] == "flash"


def test_keys_and_candidates_are_sane():
    assert tuning.SPACES["attention"] is A.SPACE
    # a growing decode cache and a batch's heads share keys; the short t stays exact
    assert S.key(8, 1, 300, 64, 64, True, "none") == S.key(8, 1, 511, 64, 64, 1, "none") \
        == (8, 1, 512, 64, 64, 1, "none")
    assert S.key(6, 100, 3, 64, 64, False, "keep") == (8, 128, 16, 64, 64, 0, "keep")
    assert S.key(8, 13, 64, 64, 64, 0, "add")[1] == 13
    for key in [S.key(8, t, 512, 64, 32, c, kind) for t in (1, 4, 5, 13, 16, 17, 512)
                for c in (0, 1) for kind in ("none", "add")]:
        cands = S.candidates(key)
        assert cands[0] == S.default(key) == A.SPACE.default(key)
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        assert all(S.checked(c) is c for c in cands)
        assert json.loads(json.dumps(cands)) == cands   # the tuning cache's format
        assert any(c["path"] == "decode" for c in cands) == (key[1] <= S.DECODE_MAX)
        assert all(c["br"] <= max(key[1], 8) for c in cands if c["path"] == "flash")


def test_schedules_never_share_a_module_they_do_not_both_run():
    names = {json.dumps(c, sort_keys=True): A.ahead("none", c)[0]
             for c in S.candidates((1, 13, 64, 8, 8, 0, "none"))}
    flash = [n for c, n in names.items() if '"flash"' in c]
    decode = [n for c, n in names.items() if '"decode"' in c]
    assert len(set(flash)) == len(flash) and len(set(decode)) == len(decode)
    # the default decode group runs in the default 8 x 32 flash module
    assert A.ahead("none", {"path": "decode", "group": 4})[0] == A.ahead("none", TODAY)[0]
    assert A.ahead("keep", TODAY)[0] != A.ahead("none", TODAY)[0]


def test_a_tuned_schedule_is_what_the_call_runs_and_the_key_is_recorded(monkeypatch):
    rng = np.random.default_rng(9)
    q, k, v, mask = operands(rng, 1, 2, 20, 40, 16, 16, "keep")
    key = S.key(2, 20, 40, 16, 16, True, "keep")
    ran = []
    library = A.library
    monkeypatch.setattr(A, "library", lambda kind, sched=None: ran.append(sched)
                        or library(kind, sched))
    monkeypatch.setattr(tuning, "_loaded", True)   # no cache file entry in the way
    monkeypatch.setitem(tuning._tuned, ("attention", key), {"path": "flash", "br": 4,
                                                            "bc": 16})
    with tuning.record() as seen:
        out = np.empty((1, 2, 20, 16), np.float32)
        A.bind(q, k, v, mask, 0.25, True, out=out)()
    assert ("attention", key) in seen
    assert ran and all(s == {"path": "flash", "br": 4, "bc": 16} for s in ran)
    assert_close(out, naive(q, k, v, mask, 0.25, True))


@pytest.mark.parametrize("bad", [{"path": "flash", "br": 8, "bc": 24},
                                 {"path": "flash", "br": 0, "bc": 32},
                                 {"path": "decode", "group": 3},
                                 {"path": "decode", "group": 4, "br": 8}, "fast"])
def test_a_bad_schedule_is_one_clear_error(bad):
    q = np.ones((1, 1, 8, 16), np.float32)
    for k in (q, q[:, :, :0]):   # no keys: nothing runs, the schedule is still checked
        with pytest.raises(TensorcError, match="not a schedule of the attention kernels"):
            A.attention(q, k, k, schedule=bad)


def test_measure_times_a_key():
    key = S.key(2, 20, 40, 16, 16, True, "add")
    for sched in S.candidates(key)[:2]:
        sec = A.SPACE.measure(key, sched, 3)
        assert math.isfinite(sec) and sec > 0
