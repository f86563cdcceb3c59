"""tensorc.optim: SGD and AdamW (generated updates) against float64 formulas and
torch.optim, gradient clipping and accumulation, schedules, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tensorc.errors import TensorcError
from tensorc.optim import (
    SGD,
    AdamW,
    Constant,
    GradAccumulator,
    WarmupCosine,
    clip_grad_norm,
    load_checkpoint,
    save_checkpoint,
    schedule_from_dict,
)

BACKENDS = ["numpy", "llvm"]
SHAPES = {"w": (5, 7), "b": (7,), "emb.weight": (3, 4, 6), "scale": ()}


def params_(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def grads_(k, shapes=SHAPES):
    """Random gradients for step k, never all zero (some big, some tiny)."""
    rng = np.random.default_rng(1000 + k)
    return {n: np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), np.float32)
            for n, s in shapes.items()}


# --- float64 references -----------------------------------------------------------------

def ref_adamw(p, grads_seq, lrs, b1, b2, eps, wd):
    p = {n: a.astype(np.float64) for n, a in p.items()}
    m = {n: np.zeros_like(a) for n, a in p.items()}
    v = {n: np.zeros_like(a) for n, a in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        for n in p:
            g = grads[n].astype(np.float64)
            p[n] *= 1 - lr * wd
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            mhat, vhat = m[n] / (1 - b1 ** t), v[n] / (1 - b2 ** t)
            p[n] -= lr * mhat / (np.sqrt(vhat) + eps)
    return p, {"exp_avg": m, "exp_avg_sq": v}


def ref_sgd(p, grads_seq, lrs, momentum, dampening, wd, nesterov):
    p = {n: a.astype(np.float64) for n, a in p.items()}
    buf = {}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for n in p:
            d = grads[n].astype(np.float64) + wd * p[n]
            if momentum:
                buf[n] = d.copy() if n not in buf else momentum * buf[n] + (1 - dampening) * d
                d = d + momentum * buf[n] if nesterov else buf[n]
            p[n] = p[n] - lr * d
    return p, {"momentum": buf}


def check_close(got: dict, want: dict, rtol, atol):
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=rtol, atol=atol, err_msg=n)


LRS = [1e-2, 3e-3, 2e-2, 1e-3, 5e-3]


# --- AdamW and SGD ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd,betas", [(0.01, (0.9, 0.999)), (0.1, (0.8, 0.99)),
                                      (0.0, (0.3, 0.9))])   # beta1 < 0.5: lerp's other form
def test_adamw_matches_the_float64_formula(backend, wd, betas):
    p = params_()
    refs = {n: a for n, a in p.items()}   # the caller's references
    opt = AdamW(p, lr=LRS[0], betas=betas, eps=1e-8, weight_decay=wd, backend=backend)
    seq = [grads_(k) for k in range(len(LRS))]
    for g, lr in zip(seq, LRS, strict=True):
        opt.step(g, lr=lr)
    want_p, want_s = ref_adamw(params_(), seq, LRS, *betas, 1e-8, wd)
    assert all(p[n] is refs[n] for n in p)   # updated in place
    check_close(p, want_p, rtol=1e-5, atol=1e-6)
    sd = opt.state_dict()
    for k in ("exp_avg", "exp_avg_sq"):
        check_close({n: sd[f"{k}.{n}"] for n in p}, want_s[k], rtol=1e-5, atol=1e-9)
    assert opt.hyper()["step"] == len(LRS) and opt.hyper()["lr"] == LRS[-1]
    json.dumps(opt.hyper())


SGD_CASES = [dict(momentum=0.0), dict(momentum=0.0, weight_decay=0.1),
             dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.05, dampening=0.1),
             dict(momentum=0.9, nesterov=True), dict(momentum=0.5, nesterov=True,
                                                     weight_decay=0.2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                   c.items()))
def test_sgd_matches_the_float64_formula(backend, case):
    p = params_()
    refs = dict(p)
    opt = SGD(p, lr=LRS[0], backend=backend, **case)
    seq = [grads_(k) for k in range(len(LRS))]
    for g, lr in zip(seq, LRS, strict=True):
        opt.step(g, lr=lr)
    want_p, want_s = ref_sgd(params_(), seq, LRS, case.get("momentum", 0.0),
                             case.get("dampening", 0.0), case.get("weight_decay", 0.0),
                             case.get("nesterov", False))
    assert all(p[n] is refs[n] for n in p)
    check_close(p, want_p, rtol=1e-5, atol=1e-6)
    sd = opt.state_dict()
    if case.get("momentum"):
        check_close({n: sd[f"momentum.{n}"] for n in p}, want_s["momentum"], rtol=1e-5,
                    atol=1e-5)
    else:
        assert sd == {}


@pytest.mark.parametrize("make", [
    lambda ps, b: AdamW(ps, lr=1e-2, weight_decay=0.1, backend=b),
    lambda ps, b: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, backend=b),
], ids=["adamw", "sgd"])
def test_llvm_agrees_with_the_numpy_reference(make):
    results = {}
    for backend in BACKENDS:
        p = params_()
        opt = make(p, backend)
        for k in range(4):
            opt.step(grads_(k))
        results[backend] = (p, opt.state_dict())
    (p0, s0), (p1, s1) = results["numpy"], results["llvm"]
    # within 1e-6 of each value, or of the tensor's scale where a sum cancels (llvm may
    # contract a * b + c into one fused multiply-add: one rounding fewer than numpy)
    for got, want in ((p1, p0), (s1, s0)):
        for n in want:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-6,
                                       atol=1e-6 * float(np.max(np.abs(want[n]))), err_msg=n)


def test_the_update_is_one_fused_graph_compiled_once():
    p = params_()
    opt = AdamW(p, backend="llvm")
    opt.step(grads_(0))
    exe = opt._compiled()
    opt.step(grads_(1), lr=5e-4)
    assert opt._compiled() is exe   # the lr and bias corrections are inputs
    assert {n.op for n in exe.graph.nodes} == {"fused"}
    assert len(exe.graph.nodes) == len(SHAPES)
    stats = exe.stats()
    assert stats["fallbacks"] == [] and stats["library_calls"] == 0
    # every output may be written over the input it updates: the step is in place
    program = exe.program()
    for i, name in enumerate(exe.output_names):
        assert name.removesuffix("_new") in [b.name for b in program.in_place.get(i, ())]


@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, backend="llvm"),
    lambda ps: SGD(ps, momentum=0.9, nesterov=True, weight_decay=0.1, backend="llvm"),
    lambda ps: SGD(ps, backend="llvm")], ids=["adamw", "sgd-nesterov", "sgd"])
def test_llvm_steps_allocate_no_arrays(make, monkeypatch):
    """The update is written straight into the parameters and state (no array is made
    for a result computed aside, which the runtime does for an `out` it cannot donate)."""
    from tensorc.backends.llvm import runtime
    p = params_()
    opt = make(p)
    opt.step(grads_(0))
    g = grads_(1)
    monkeypatch.setattr(runtime.np, "empty", None)
    opt.step(g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_torch_optim(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison "
                                "with torch.optim is skipped")
    torch.set_num_threads(1)
    cases = [("AdamW", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)),
             ("SGD", dict(lr=1e-2, momentum=0.9, weight_decay=0.05)),
             ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
             ("SGD", dict(lr=1e-2))]
    worst = 0.0
    for kind, kw in cases:
        p = params_()
        ours = (AdamW if kind == "AdamW" else SGD)(p, backend=backend, **kw)
        tp = {n: torch.tensor(a) for n, a in params_().items()}
        theirs = getattr(torch.optim, kind)(list(tp.values()), foreach=False, **kw)
        for k in range(len(LRS)):
            g = grads_(k)
            ours.step(g)
            for n, t in tp.items():
                t.grad = torch.tensor(g[n])
            theirs.step()
        for n in p:
            want = tp[n].numpy()
            np.testing.assert_allclose(p[n], want, rtol=2e-6, atol=1e-7, err_msg=f"{kind} {n}")
            worst = max(worst, float(np.max(np.abs(p[n] - want) / (np.abs(want) + 1e-7))))
    print(f"largest relative difference from torch.optim: {worst:.2e}")


def test_bad_inputs_are_one_line_errors():
    p = params_()
    with pytest.raises(TensorcError, match="float32"):
        AdamW({"x": np.zeros(3)})
    with pytest.raises(TensorcError, match="float32"):
        SGD({"x": np.zeros((4, 4), np.float32)[:, ::2]})
    tied = np.zeros((4, 4), np.float32)
    with pytest.raises(TensorcError, match="share memory"):
        AdamW({"wte": tied, "head": tied, "other": np.zeros(2, np.float32)})
    with pytest.raises(TensorcError, match="'whole' and 'row' share memory"):
        AdamW({"whole": tied, "row": tied[1]})
    with pytest.raises(TensorcError, match="no parameters"):
        SGD({})
    with pytest.raises(TensorcError, match="nesterov"):
        SGD(p, nesterov=True)
    opt = SGD(p, lr=0.1)
    g = grads_(0)
    with pytest.raises(TensorcError, match="missing"):
        opt.step({n: a for n, a in g.items() if n != "w"})
    with pytest.raises(TensorcError, match="unknown"):
        opt.step({**g, "zz": g["w"]})
    with pytest.raises(TensorcError, match="shape"):
        opt.step({**g, "w": g["w"].T})
    assert opt.step_count == 0
    opt.step({n: a.astype(np.float64) for n, a in g.items()})   # converted
    assert opt.step_count == 1


# --- gradients ----------------------------------------------------------------------------

def test_clip_grad_norm_scales_like_torch():
    g = grads_(0)
    want = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in g.values()))
    before = {n: a.copy() for n, a in g.items()}
    norm = clip_grad_norm(g, max_norm=want * 2)
    assert norm == pytest.approx(want, rel=1e-7)
    assert all(np.array_equal(g[n], before[n]) for n in g)   # under the limit: untouched
    norm = clip_grad_norm(g, max_norm=1.0)
    assert norm == pytest.approx(want, rel=1e-7)
    coef = np.float32(1.0 / (norm + 1e-6))
    for n in g:
        np.testing.assert_array_equal(g[n], before[n] * coef)
    after = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in g.values()))
    assert after == pytest.approx(1.0, rel=1e-5)
    bad = {"x": np.array([1.0, np.inf], np.float32)}
    with pytest.raises(TensorcError, match="norm"):
        clip_grad_norm(bad, 1.0, error_if_nonfinite=True)
    assert clip_grad_norm(bad, 1.0) == math.inf


def test_clip_grad_norm_against_torch():
    torch = pytest.importorskip("torch", reason="torch is not installed: the comparison "
                                "with torch.nn.utils.clip_grad_norm_ is skipped")
    for max_norm in (0.5, 1e6):
        g = grads_(3)
        ts = [torch.zeros(a.shape, requires_grad=True) for a in g.values()]
        for t, a in zip(ts, g.values(), strict=True):
            t.grad = torch.tensor(a)
        want = float(torch.nn.utils.clip_grad_norm_(ts, max_norm))
        assert clip_grad_norm(g, max_norm) == pytest.approx(want, rel=1e-6)
        for t, a in zip(ts, g.values(), strict=True):
            np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_grad_accumulator_averages_micro_batches():
    p = params_()
    acc = GradAccumulator(p)
    bufs = {n: b for n, b in acc.buffers.items()}
    micro = [grads_(k) for k in range(3)]
    for g in micro:
        acc.add(g)
    mean = acc.mean()
    for n in p:
        want = sum(g[n].astype(np.float64) for g in micro) / 3
        np.testing.assert_allclose(mean[n], want, rtol=1e-5, atol=1e-6)
        assert mean[n] is bufs[n]   # persistent buffers
    assert acc.mean() is mean and acc.count == 3   # idempotent
    acc.add(micro[0])                              # a new sum starts
    np.testing.assert_array_equal(acc.mean()["w"], micro[0]["w"])
    kept = {n: b.copy() for n, b in acc.buffers.items()}
    with pytest.raises(TensorcError, match="shape"):
        acc.add({**micro[1], "scale": micro[0]["b"]})
    assert all(np.array_equal(acc.buffers[n], kept[n]) for n in kept)   # nothing added
    assert acc.count == 1 and acc.mean()["w"] is bufs["w"]
    with pytest.raises(TensorcError, match="accumulated"):
        GradAccumulator(p).mean()


# --- schedules -----------------------------------------------------------------------------

def test_warmup_cosine_values():
    s = WarmupCosine(1e-3, warmup_steps=10, total_steps=110)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(5e-4)
    assert s(110) == pytest.approx(0.0, abs=1e-15)
    assert s(500) == pytest.approx(0.0, abs=1e-15)   # stays at the floor

    def hf(step, warmup=10, total=110):   # transformers' get_cosine_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    for step in range(111):
        assert s(step) == pytest.approx(1e-3 * hf(step), abs=1e-15)
    m = WarmupCosine(1.0, 0, 100, min_lr=0.1)
    assert m(0) == 1.0 and m(50) == pytest.approx(0.55) and m(100) == pytest.approx(0.1)
    for sched in (s, m, Constant(3e-4)):
        back = schedule_from_dict(json.loads(json.dumps(sched.to_dict())))
        assert type(back) is type(sched) and [back(i) for i in range(0, 120, 7)] == \
            [sched(i) for i in range(0, 120, 7)]
    assert Constant(3e-4)(12345) == 3e-4
    with pytest.raises(TensorcError, match="schedule"):
        schedule_from_dict({"type": "Linear"})
    with pytest.raises(TensorcError):
        WarmupCosine(1.0, 10, 5)


# --- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    p = params_()
    opt = AdamW(p, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05)
    for k in range(2):
        opt.step(grads_(k))
    rng = np.random.default_rng(7)
    rng.standard_normal(5)
    sched = WarmupCosine(1e-3, 5, 50, min_lr=1e-5)
    path = save_checkpoint(tmp_path / "ck", p, opt, step=2, extra={"data_pos": 1234},
                           schedule=sched, rng=rng)
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors",
                                        "trainer.json"]
    assert os.listdir(tmp_path) == ["ck"]   # no temporary folder left
    ck = load_checkpoint(path)
    assert ck.step == 2 and ck.extra == {"data_pos": 1234}
    assert ck.optimizer_hyper == opt.hyper()
    assert all(np.array_equal(ck.params[n], p[n]) for n in p)
    sd = opt.state_dict()
    assert sd.keys() == ck.optimizer_state.keys()
    assert all(np.array_equal(ck.optimizer_state[k], sd[k]) for k in sd)
    assert ck.make_schedule().to_dict() == sched.to_dict()
    again = ck.make_rng()
    np.testing.assert_array_equal(again.standard_normal(4), rng.standard_normal(4))
    json.load(open(os.path.join(path, "trainer.json")))   # plain JSON
    # another bit generator (its state holds an array): restored into a live Generator
    mt = np.random.Generator(np.random.MT19937(5))
    mt.random(3)
    save_checkpoint(tmp_path / "mt", p, opt, step=2, rng=mt)
    target = np.random.Generator(np.random.MT19937(0))
    load_checkpoint(tmp_path / "mt").restore(params_(), rng=target)
    np.testing.assert_array_equal(target.random(5), mt.random(5))
    os.rename(tmp_path / "mt", tmp_path / "mt-done")
    # writing again replaces the old checkpoint whole
    save_checkpoint(path, p, opt, step=3, extra={})
    assert load_checkpoint(path).step == 3 and load_checkpoint(path).rng_state is None
    assert sorted(os.listdir(tmp_path)) == ["ck", "mt-done"]


def _run(backend, kind, steps, start=None, stop=None, directory=None):
    """Train `steps` steps with a schedule and data drawn from a saved RNG; from a
    checkpoint in `directory` when `start` is given; save one at `stop`."""
    sched = WarmupCosine(1e-2, 2, steps)
    p = params_()
    opt = (AdamW(p, lr=sched(0), weight_decay=0.1, backend=backend) if kind == "adamw" else
           SGD(p, lr=sched(0), momentum=0.9, nesterov=True, weight_decay=0.01,
               backend=backend))
    rng = np.random.default_rng(3)
    step = 0
    if start is not None:
        ck = load_checkpoint(directory)
        ck.restore(p, opt, rng)
        sched, step = ck.make_schedule(), ck.step
    while step < (stop if stop is not None else steps):
        g = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in p.items()}
        clip_grad_norm(g, 5.0)
        step += 1
        opt.step(g, lr=sched(step))
    if stop is not None:
        save_checkpoint(directory, p, opt, step, schedule=sched, rng=rng)
    return p, opt.state_dict(), opt.hyper()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resume_continues_bit_for_bit(tmp_path, backend, kind):
    n, k = 7, 3
    p_straight, s_straight, h_straight = _run(backend, kind, n)
    _run(backend, kind, n, stop=k, directory=tmp_path / "ck")
    p_resumed, s_resumed, h_resumed = _run(backend, kind, n, start=k,
                                           directory=tmp_path / "ck")
    assert h_resumed == h_straight
    for name in p_straight:
        np.testing.assert_array_equal(p_resumed[name], p_straight[name])
    assert s_resumed.keys() == s_straight.keys() and s_straight
    for name in s_straight:
        np.testing.assert_array_equal(s_resumed[name], s_straight[name])


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    p = params_()
    opt = AdamW(p)
    opt.step(grads_(0))
    good = save_checkpoint(tmp_path / "good", p, opt, step=1)

    def fails(match, fn):
        with pytest.raises(TensorcError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)

    fails("no such directory", lambda: load_checkpoint(tmp_path / "nowhere"))
    for f in ("model.safetensors", "optimizer.safetensors", "trainer.json"):
        d = tmp_path / f"missing-{f}"
        save_checkpoint(d, p, opt, step=1)
        os.remove(d / f)
        fails(f"missing {f}", lambda d=d: load_checkpoint(d))
    d = tmp_path / "corrupt"
    save_checkpoint(d, p, opt, step=1)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    fails("cannot read model.safetensors", lambda: load_checkpoint(d))
    (d / "model.safetensors").write_bytes(b"")
    fails("cannot read model.safetensors", lambda: load_checkpoint(d))
    d2 = tmp_path / "badjson"
    save_checkpoint(d2, p, opt, step=1)
    (d2 / "trainer.json").write_text("{")
    fails("not valid JSON", lambda: load_checkpoint(d2))
    (d2 / "trainer.json").write_text("[]")
    fails("no step", lambda: load_checkpoint(d2))
    ck = load_checkpoint(good)
    other = params_(shapes={**SHAPES, "w": (7, 5)})
    fails("tensor 'w'", lambda: ck.restore(other, AdamW(other)))
    fewer = {n: a for n, a in params_().items() if n != "b"}
    fails("does not fit the model: unexpected", lambda: ck.restore(fewer))
    more = {**params_(), "extra.weight": np.zeros(3, np.float32)}
    fails("does not fit the model: missing", lambda: ck.restore(more))
    fails("for 'AdamW', not SGD", lambda: ck.restore(params_(), SGD(params_(), momentum=0.9)))
    fails("for 'AdamW', not SGD", lambda: ck.restore(params_(), SGD(params_())))
    del ck.optimizer_state["exp_avg.w"]
    fails("AdamW state does not fit the parameters: missing", lambda: ck.restore(
        params_(), AdamW(params_())))
    ck = load_checkpoint(good)
    fails("no RNG state", lambda: ck.restore(params_(), rng=np.random.default_rng()))
    target = params_(5)
    before = {n: a.copy() for n, a in target.items()}
    with pytest.raises(TensorcError):
        ck.restore(target, SGD(target, momentum=0.9))
    assert all(np.array_equal(target[n], before[n]) for n in target)   # nothing written
    (tmp_path / "afile").write_text("x")
    fails("not a directory", lambda: save_checkpoint(tmp_path / "afile", p, opt, step=1))
    fails("not JSON-able", lambda: save_checkpoint(tmp_path / "x", p, opt, 1,
                                                   extra={"a": object()}))
