"""Compile time of the LLVM backend: cold (empty JIT cache) and warm (cache filled).

    .venv/bin/python benchmarks/compile_time.py [--model gpt] [--seq 128] [--seq2 16]
        [--repeat 3] [--profile] [--baseline CHECKOUT]

Each figure is taken in a fresh process with its own cache folder
(`TENSORC_CACHE_DIR`): "cold" starts from an empty folder, "warm" reuses the folder a
cold run filled, and "second shape" compiles batch 1 seq `--seq2` into the folder that
`--seq` filled (what a model's second shape costs when entries are shared). The timed
region is `tensorc.compile(graph, "llvm", passes="O2")` plus the first call (which
lowers, generates and JIT-compiles or loads the kernels, packs the weights, and runs),
after the model is traced (the trace is reported apart). The small preset, batch 1.
With `--repeat N` each figure is the median of N fresh processes; the CPU time spent
in the same region (all threads of the process, and its compile-ahead child) is
printed beside it, since on a busy machine it moves less than the wall-clock time.
`--profile` prints, for one cold run, what each LLVM module build cost. `--baseline
CHECKOUT` also times tensorc from another source checkout (e.g. `git archive main |
tar -x -C /tmp/main`), its runs taking turns with this checkout's, so that changes in
machine load hit both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from engines import cpu_model  # beside this script


def worker(model_name: str, seq: int, profile: bool) -> None:
    """Subprocess entry: trace, then compile + first call; prints JSON timings."""
    t0 = time.perf_counter()
    import tensorc
    import tensorc.models
    from tensorc.backends.llvm import jit
    t_import = time.perf_counter() - t0
    model = tensorc.models.get(model_name, "small")
    feeds = model.example_inputs(batch=1, seq=None if model_name == "vit" else seq)
    t = time.perf_counter()
    graph = tensorc.trace(model, **feeds)
    t_trace = time.perf_counter() - t
    llvm_modules = []
    if profile:   # time each LLVM build (optimise + code generation) of this process
        build = jit._build_object

        def timed(text, *args):
            t = time.perf_counter()
            obj = build(text, *args)
            llvm_modules.append([round(time.perf_counter() - t, 3), len(text)])
            return obj
        jit._build_object = timed
    t, cpu = time.perf_counter(), _cpu()
    exe = tensorc.compile(graph, "llvm", passes="O2")
    t_passes = time.perf_counter() - t
    exe.run(feeds)
    total, cpu = time.perf_counter() - t, _cpu() - cpu
    print(json.dumps({"import_s": t_import, "trace_s": t_trace, "passes_s": t_passes,
                      "compile_s": total, "cpu_s": cpu, "jit": dict(jit.stats),
                      "llvm_builds": llvm_modules}), flush=True)


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (the JIT's
    compile-ahead child, once reaped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(model: str, seq: int, cache: str, profile: bool = False,
        checkout: str | None = None) -> dict:
    env = dict(os.environ, TENSORC_CACHE_DIR=cache)
    if checkout:
        env["PYTHONPATH"] = os.path.abspath(checkout)
    cmd = [sys.executable, __file__, "--worker", model, "--seq", str(seq)]
    out = subprocess.run(cmd + (["--profile"] if profile else []), env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(args, checkout: str | None, into: dict) -> None:
    """One cold, warm and second-shape run each, in a fresh cache folder."""
    with tempfile.TemporaryDirectory() as cache:
        runs = [("cold", args.seq), ("warm", args.seq)] + \
            ([("second", args.seq2)] if args.seq2 else [])
        for what, seq in runs:
            r = run(args.model, seq, cache, checkout=checkout)
            into.setdefault(what, []).append(r["compile_s"])
            into.setdefault(what + "_cpu", []).append(r["cpu_s"])
            into[what + "_jit"] = r["jit"]
            into["trace_s"], into["passes_s"] = r["trace_s"], r["passes_s"]


def report(label: str, args, got: dict) -> None:
    print(f"\n{label}: trace (not in the figures) {got['trace_s']:.2f} s, passes O2 "
          f"{got['passes_s']:.2f} s")
    names = {"cold": f"cold  (seq {args.seq}, empty cache)",
             "warm": f"warm  (seq {args.seq}, cache filled)",
             "second": f"second shape (seq {args.seq2}, after seq {args.seq})"}
    for what, name in names.items():
        if what in got:
            runs = ", ".join(f"{x:.2f}" for x in got[what])
            print(f"  {name}: {statistics.median(got[what]):.2f} s  (runs: {runs}; CPU "
                  f"{statistics.median(got[what + '_cpu']):.2f} s)  jit {got[what + '_jit']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seq2", type=int, default=16, help="the second shape (0: none)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also time tensorc from this source checkout, taking turns")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.seq, args.profile)
        return
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; "
          f"TENSORC_NUM_THREADS={os.environ.get('TENSORC_NUM_THREADS', '(unset)')}; "
          f"{args.model} small, batch 1, pipeline O2, llvm backend; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    ours, base = {}, {}
    for _ in range(args.repeat):
        figures(args, None, ours)
        if args.baseline:
            figures(args, args.baseline, base)
    report("this checkout", args, ours)
    if args.baseline:
        report(f"baseline {args.baseline}", args, base)
    if args.profile:
        with tempfile.TemporaryDirectory() as cache:
            p = run(args.model, args.seq, cache, profile=True)
        print("\none cold run, LLVM builds [seconds, IR characters]:")
        for b in p["llvm_builds"]:
            print(f"  {b[0]:.3f} s  {b[1]} chars")
        print(f"  LLVM total {sum(b[0] for b in p['llvm_builds']):.2f} s of "
              f"{p['compile_s']:.2f} s")


if __name__ == "__main__":
    main()
