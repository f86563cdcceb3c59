"""One AdamW step over GPT-small-shaped parameters (the zoo's `gpt` preset `small`: 23.6 M
parameters in ~80 tensors): tensorc's generated update (llvm; numpy, the reference),
a plain numpy AdamW, and torch.optim.AdamW (if torch is importable).

    python benchmarks/optim.py [--threads 2] [--rounds 5] [--steps 3]

Each engine runs in a process of its own (pool threads that spin after a call would
slow the next engine); they take turns, a few steps each per round, so a change in the
machine's load hits all alike (`engines.py`). Prints each one's median and best step.

The llvm engines: `llvm` is `tensorc.optim.AdamW` as shipped (the parameter and state
arrays are their own updates' `out`, updated in place: `Program.in_place`); `llvm-spare`
writes the updates into second buffers instead, swaps the state with them and copies the
parameters back (what it did before the runtime could update in place).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ENGINES = ["llvm", "llvm-spare", "numpy-backend", "numpy-plain", "torch", "torch-foreach"]


def gpt_small_shapes() -> dict[str, tuple]:
    import tensorc
    model = tensorc.models.get("gpt", preset="small")
    return {n: tuple(p.init_shape) for n, p in model.named_parameters()}


def make(shapes, seed=0):
    rng = np.random.default_rng(seed)
    params = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02) for n, s in shapes.items()}
    grads = {n: rng.standard_normal(s, dtype=np.float32) * 1e-3 for n, s in shapes.items()}
    return params, grads


def numpy_adamw(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
    """A plain numpy AdamW (in-place ufuncs, one temporary per tensor)."""
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    tmp = {n: np.empty_like(p) for n, p in params.items()}
    t = [0]
    b1, b2 = betas

    def step(grads):
        t[0] += 1
        bc1, bc2 = 1 - b1 ** t[0], 1 - b2 ** t[0]
        for n, p in params.items():
            g, mm, vv, d = grads[n], m[n], v[n], tmp[n]
            p *= np.float32(1 - lr * wd)
            mm += np.float32(1 - b1) * (g - mm)
            vv *= np.float32(b2)
            np.multiply(g, g, out=d)
            d *= np.float32(1 - b2)
            vv += d
            np.sqrt(vv, out=d)
            d /= np.float32(bc2 ** 0.5)
            d += np.float32(eps)
            np.divide(mm, d, out=d)
            d *= np.float32(-lr / bc1)
            p += d
    return step


def worker(engine: str, threads: int) -> None:
    shapes = gpt_small_shapes()
    params, grads = make(shapes)
    if engine.startswith("torch"):
        import torch
        torch.set_num_threads(threads)
        tp = [torch.from_numpy(p) for p in params.values()]
        for p, g in zip(tp, grads.values(), strict=True):
            p.grad = torch.from_numpy(g)
        opt = torch.optim.AdamW(tp, lr=1e-3, foreach=engine == "torch-foreach")

        def step():
            opt.step()
    elif engine == "numpy-plain":
        fn = numpy_adamw(params)

        def step():
            fn(grads)
    else:
        from tensorc.optim import AdamW
        backend = "numpy" if engine == "numpy-backend" else "llvm"
        opt = AdamW(params, lr=1e-3, backend=backend)
        if engine == "llvm-spare":
            spare = {k: {n: np.empty_like(p) for n, p in params.items()}
                     for k in ("p", *opt.STATE)}

            def step():
                opt.step_count += 1
                for s, value in opt._scalars().items():
                    opt._scalar[s][...] = value
                feeds, out = dict(opt._scalar), {}
                for i, n in enumerate(opt.names):
                    feeds[f"p{i}"] = opt.params[n].reshape(-1)
                    out[f"p{i}_new"] = spare["p"][n].reshape(-1)
                    feeds[f"g{i}"] = grads[n].reshape(-1)
                    for k in opt.STATE:
                        feeds[f"{k}{i}"] = opt.state[k][n].reshape(-1)
                        out[f"{k}{i}_new"] = spare[k][n].reshape(-1)
                opt._compiled().run(feeds, out=out)
                for n in opt.names:
                    np.copyto(opt.params[n], spare["p"][n])
                for k in opt.STATE:
                    opt.state[k], spare[k] = spare[k], opt.state[k]
        else:
            def step():
                opt.step(grads)
    t0 = time.perf_counter()
    step()   # compiles
    first = time.perf_counter() - t0
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:   # "run N": N steps, their times in ms
        times = []
        for _ in range(int(line.split()[1])):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"times": times, "first_ms": first * 1e3,
                          "params": int(sum(np.prod(s) for s in shapes.values())),
                          "tensors": len(shapes)}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per engine per round")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.threads)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engines import cpu_model, has, start_engines, take_turns
    env = {**os.environ, "TENSORC_NUM_THREADS": str(a.threads),
           "OMP_NUM_THREADS": str(a.threads), "OPENBLAS_NUM_THREADS": str(a.threads)}
    print(f"AdamW step, GPT-small parameters, {a.threads} threads, {cpu_model()}; "
          f"{a.rounds} rounds of {a.steps} steps, the engines taking turns")
    engines = [e for e in a.engines.split(",") if not e.startswith("torch") or has("torch")]
    for e in sorted(set(a.engines.split(",")) - set(engines)):
        print(f"{e:14s} skipped: torch is not importable")

    def start(engine):
        return subprocess.Popen([sys.executable, __file__, "--worker", engine, "--threads",
                                 str(a.threads)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    procs, failed = start_engines({e: lambda e=e: start(e) for e in engines})
    for e, why in failed.items():
        print(f"{e:14s} {why}")
    for e, answers in take_turns(procs, a.rounds, lambda e: f"run {a.steps}").items():
        ok = [d for d in answers if isinstance(d, dict)]
        if not ok:
            print(f"{e:14s} {answers[-1]}")
            continue
        times = [t for d in ok for t in d["times"]]
        d = ok[0]
        print(f"{e:14s} {statistics.median(times):8.1f} ms median (min {min(times):.1f}; "
              f"first call {d['first_ms']:.0f} ms)  {d['params'] / 1e6:.1f} M params in "
              f"{d['tensors']} tensors")


if __name__ == "__main__":
    main()
