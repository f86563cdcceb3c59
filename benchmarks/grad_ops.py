"""The gradient ops training runs (scatter_add, conv2d_grad, attention_grad) on llvm,
against numpy and, optionally, another checkout of tensorc.

    .venv/bin/python benchmarks/grad_ops.py [--threads 2] [--rounds 3] [--repeat 20]
        [--baseline CHECKOUT] [--cases embed,attn-b8,...]

Cases (GPT small / ViT small shapes, float32):

- embed: the embedding gradient as `grad` builds it, scatter_add of 1024 rows of 512
  into zeros [8192, 512]; numpy: np.zeros + np.add.at;
- conv-patch: conv2d_grad of ViT small's patch embedding (x [8, 3, 224, 224], w [384,
  3, 16, 16], stride 16); conv-3x3: a CNN layer (x [8, 64, 32, 32], w [64, 64, 3, 3],
  pad 1); numpy: the op's reference;
- attn-*: attention_grad (q, k, v, dy [b, h, t, 64]) for b8 h8 t128 causal and not,
  b1, grouped heads (hk 2), one key/value head (b1 hk1) and t 1024; numpy: the op's
  reference (float64 inside), skipped at t 1024. Each row also has llvm's forward
  flash attention on the same shapes, the usual yardstick (a backward does about 2.5x
  a forward's work).

Each engine runs in its own process; they take turns for --rounds rounds, a cell is
the median of --repeat calls and keeps its best round (the machine may be shared).
`--baseline CHECKOUT` adds tensorc from another source checkout (e.g. `git archive
main | tar -x -C /tmp/main`): there an op without a rule runs its reference, or its
decomposition (attention_grad).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CASES = ["embed", "conv-patch", "conv-3x3", "attn-b8", "attn-b8-full", "attn-b1",
         "attn-gqa", "attn-mqa", "attn-t1024"]
ATTN = {   # b, h, hk, t, causal
    "attn-b8": (8, 8, 8, 128, True), "attn-b8-full": (8, 8, 8, 128, False),
    "attn-b1": (1, 8, 8, 128, True), "attn-gqa": (8, 8, 2, 128, True),
    "attn-mqa": (1, 8, 1, 128, True), "attn-t1024": (1, 8, 8, 1024, True),
}


def _inputs(case: str):
    """(op, input arrays, attrs) of a case."""
    import numpy as np
    rng = np.random.default_rng(0)
    if case == "embed":
        return "scatter_add", [rng.integers(0, 8192, 1024),
                               rng.standard_normal((1024, 512)).astype(np.float32)], {}
    if case.startswith("conv"):
        xs, ws, attrs, out = ((8, 3, 224, 224), (384, 3, 16, 16), {"strides": (16, 16)},
                              (8, 384, 14, 14)) if case == "conv-patch" else \
            ((8, 64, 32, 32), (64, 64, 3, 3), {"pads": (1, 1, 1, 1)}, (8, 64, 32, 32))
        return "conv2d_grad", [rng.standard_normal(s).astype(np.float32)
                               for s in (xs, ws, out)], attrs
    b, h, hk, t, causal = ATTN[case]
    return "attention_grad", [rng.standard_normal(s).astype(np.float32) for s in
                              ((b, h, t, 64), (b, hk, t, 64), (b, hk, t, 64), (b, h, t, 64))], \
        {"scale": 0.125, "causal": causal}


def _tensorc_fns(case: str, threads: int) -> dict:
    """name -> zero-argument function: the case's op on llvm (and the forward)."""
    from tensorc.backends import get_backend
    from tensorc.ir import Graph, TensorType
    op, arrays, attrs = _inputs(case)
    g = Graph("t")
    names = [f"x{i}" for i in range(len(arrays))]
    ins = [g.add_input(n, TensorType.of(a)) for n, a in zip(names, arrays, strict=True)]
    if op == "scatter_add":   # into zeros, as `grad` writes gather's transpose
        (zeros,) = g.add_node("full", [], {"shape": (8192, 512), "value": 0.0})
        ins = [zeros, *ins]
    g.outputs = list(g.add_node(op, ins, attrs))
    exe = get_backend("llvm").compile(g, threads=threads)
    feeds = dict(zip(names, arrays, strict=True))
    fns = {"op": lambda: exe.run(feeds)}
    if op == "attention_grad":
        f = Graph("f")
        fin = [f.add_input(n, TensorType.of(a)) for n, a in zip(names[:3], arrays[:3],
                                                                strict=True)]
        f.outputs = list(f.add_node("attention", fin, attrs))
        fexe = get_backend("llvm").compile(f, threads=threads)
        ffeeds = dict(zip(names[:3], arrays[:3], strict=True))
        fns["forward"] = lambda: fexe.run(ffeeds)
    fns["op"]()
    fns["fallbacks"] = len(exe.stats()["fallbacks"])
    return fns


def _numpy_fns(case: str) -> dict:
    import numpy as np

    from tensorc.ops import get_op
    op, arrays, attrs = _inputs(case)
    if case == "attn-t1024":
        return {}
    if op == "scatter_add":
        idx, upd = arrays

        def embed():
            out = np.zeros((8192, 512), np.float32)
            np.add.at(out, idx, upd)
            return out
        return {"op": embed}
    opdef = get_op(op)
    full = opdef.complete_attrs(attrs)
    return {"op": lambda: opdef.evaluate(arrays, full)}


def worker(engine: str, threads: int, cases: list[str]) -> None:
    """Answer requests {"case", "fn", "repeat"} with {"ms": median} (or null)."""
    fns = {c: (_numpy_fns(c) if engine == "numpy" else _tensorc_fns(c, threads))
           for c in cases}
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        fn = fns[req["case"]].get(req["fn"])
        if fn is None:
            print(json.dumps(None), flush=True)
            continue
        if req["fn"] == "fallbacks":
            print(json.dumps(fn), flush=True)
            continue
        times = []
        for _ in range(req["repeat"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        times.sort()
        print(json.dumps(times[len(times) // 2] * 1e3), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--baseline", help="another tensorc source checkout to compare")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.cases.split(",")
    if args.worker:
        worker(args.worker, args.threads, cases)
        return
    from engines import answer, cpu_model, start_engines
    env = dict(os.environ, TENSORC_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    root = os.path.dirname(HERE)

    def starter(engine, checkout):
        def start():
            e = dict(env)
            if checkout:
                e["PYTHONPATH"] = checkout
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine,
                   "--threads", str(args.threads), "--cases", ",".join(cases)]
            return subprocess.Popen(cmd, cwd=checkout or root, env=e, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        return start
    starters = {"tensorc": starter("tensorc", None), "numpy": starter("numpy", None)}
    if args.baseline:
        starters["baseline"] = starter("baseline", os.path.abspath(args.baseline))
    print(f"# {cpu_model()}, {args.threads} threads, median of {args.repeat} calls, "
          f"best of {args.rounds} rounds (ms)")
    procs, failed = start_engines(starters)
    for key, why in failed.items():
        print(f"# {key}: {why}")
    best: dict = {}
    for case in cases:
        for fn in ("op", "forward", "fallbacks"):
            reps = max(3, args.repeat // 4) if case in ("attn-t1024", "conv-patch",
                                                        "conv-3x3") else args.repeat
            line = json.dumps({"case": case, "fn": fn, "repeat": reps}) + "\n"
            for _ in range(args.rounds if fn != "fallbacks" else 1):
                for key, proc in procs.items():   # the engines take turns
                    proc.stdin.write(line)
                    proc.stdin.flush()
                    got = answer(proc)
                    if isinstance(got, (int, float)):
                        old = best.get((case, fn, key))
                        best[(case, fn, key)] = got if old is None else min(old, got)
                    time.sleep(0.2)   # let spinning threads go idle
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    engines = ["tensorc"] + (["baseline"] if args.baseline else []) + ["numpy"]
    head = ["case"] + [f"{e}" for e in engines] + ["llvm forward", "fallbacks"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def cell(v):
        return "-" if v is None else f"{v:.2f}"
    for case in cases:
        row = [case] + [cell(best.get((case, "op", e))) for e in engines]
        row += [cell(best.get((case, "forward", "tensorc")))]
        fb = [best.get((case, "fallbacks", e)) for e in engines if e != "numpy"]
        row += ["/".join("-" if f is None else str(int(f)) for f in fb)]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
