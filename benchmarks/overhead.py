"""Per-call overhead: tensorc llvm vs numpy vs ONNX Runtime on work small enough that
the cost of a call shows.

    .venv/bin/python benchmarks/overhead.py [--rounds 20] [--runs 200] [--threads 2]
        [--baseline CHECKOUT] [--cases gpt,matmul]

Two cases: GPT tiny (`tensorc.models`, preset tiny) at batch 1, seq 16, and one
matmul 128x512 @ 512x2048 with both operands graph inputs, called `exe(a, b)`
(numpy: `a @ b`; both return a fresh array). ONNX Runtime runs tensorc's own ONNX
export of the same graph. As in `models.py`, every engine lives in its own process and
the engines take turns, `--runs` calls each per round after 20 untimed ones, so a change
in machine load hits them alike; the table gives medians. Every engine runs on
`--threads` threads (TENSORC_NUM_THREADS, OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, ONNX
Runtime's intra-op pool), printed with the results. `--baseline CHECKOUT` adds "llvm
(baseline)", tensorc from another source checkout (e.g. `git archive main | tar -x -C
/tmp/main`), in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from engines import start_engines, take_turns  # beside this script

CASES = {"gpt tiny b1 s16": ("llvm", "ort"),
         "matmul 128x512x2048": ("llvm", "numpy", "ort")}
MATMUL = (128, 512, 2048)


def build(case: str):
    """(graph, feeds) of a case."""
    import tensorc
    import tensorc.models
    from tensorc.ir import Graph, TensorType
    if case.startswith("gpt"):
        model = tensorc.models.get("gpt", "tiny")
        feeds = model.example_inputs(batch=1, seq=16)
        return tensorc.trace(model, **feeds), feeds
    m, k, n = MATMUL
    g = Graph("matmul")
    a = g.add_input("a", TensorType((m, k), "f32"))
    b = g.add_input("b", TensorType((k, n), "f32"))
    g.outputs = [g.add("matmul", a, b)]
    rng = np.random.default_rng(0)
    return g, {"a": rng.standard_normal((m, k), np.float32),
               "b": rng.standard_normal((k, n), np.float32)}


def engine(peer: str, case: str):
    """A zero-argument function running one call, or why it cannot run."""
    g, feeds = build(case)
    if peer == "llvm":
        import tensorc
        exe = tensorc.compile(g, "llvm", passes="O2")
        args = [feeds[n] for n in exe.input_names]
        return lambda: exe(*args)
    if peer == "numpy":
        a, b = feeds["a"], feeds["b"]
        return lambda: a @ b
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime not installed"
    from tensorc.frontend.onnx import save
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    save(g, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ["TENSORC_NUM_THREADS"])
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    return lambda: sess.run(None, ort_feeds)


def worker(peer: str, case: str) -> None:
    """Subprocess entry: build one engine, then answer `run N` with N times (JSON)."""
    fn = engine(peer, case)
    if isinstance(fn, str):
        print(json.dumps(fn), flush=True)
        return
    for _ in range(20):
        fn()
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        runs = int(line.split()[1])
        for _ in range(20):   # after the other engines' turns: caches and clocks back
            fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)


def start(peer: str, case: str, env_changes: dict) -> subprocess.Popen:
    env = dict(os.environ, **env_changes)
    return subprocess.Popen([sys.executable, __file__, "--worker", peer, case], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def interleaved(case: str, rounds: int, runs: int, baseline: str | None) -> dict:
    """Median ms per engine, the engines taking turns (see the module docstring)."""
    configs = {p: (p, {}) for p in CASES[case]}
    if baseline:
        configs["llvm (baseline)"] = ("llvm", {"PYTHONPATH": os.path.abspath(baseline)})
    procs, result = start_engines({key: lambda peer=peer, env=env: start(peer, case, env)
                                   for key, (peer, env) in configs.items()})
    for key, answers in take_turns(procs, rounds, lambda key: f"run {runs}").items():
        result[key] = 1000 * float(np.median(sum(answers, [])))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=200, help="calls per engine per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", metavar="CHECKOUT")
    ap.add_argument("--cases", default="gpt,matmul", help="which cases (gpt, matmul)")
    ap.add_argument("--worker", nargs=2, metavar=("PEER", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    for key in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[key] = str(args.threads)   # the workers inherit it
    print(f"{args.threads} threads for every engine, medians of {args.rounds} interleaved "
          f"rounds of {args.runs} calls; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    m, k, n = MATMUL
    print("| case | engine | ms per call | vs llvm | GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for case in [c for c in CASES if c.split()[0] in args.cases.split(",")]:
        res = interleaved(case, args.rounds, args.runs, args.baseline)
        for key, ms in res.items():
            if isinstance(ms, str):
                print(f"| {case} | {key} | {ms} | | |")
                continue
            rel = f"{ms / res['llvm']:.2f}x" if isinstance(res.get("llvm"), float) else "-"
            gflops = f"{2 * m * k * n / ms / 1e6:.0f}" if case.startswith("matmul") else ""
            print(f"| {case} | {key} | {ms:.4f} | {rel} | {gflops} |", flush=True)


if __name__ == "__main__":
    main()
