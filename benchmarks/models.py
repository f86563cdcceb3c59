"""Model latency: tensorc llvm vs tensorc numpy vs ONNX Runtime vs PyTorch CPU.

    .venv/bin/python benchmarks/models.py [--models gpt,bert,vit] [--batch 1] [--seq 128]
        [--rounds 10] [--runs 3] [--threads N] [--baseline CHECKOUT]

Small presets, batch 1, seq 128 by default, same weights everywhere (ONNX Runtime runs
tensorc's own ONNX export of the traced graph; PyTorch, eager and torch.compile,
runs the same graph through benchmarks/torch_peer.py, attention as SDPA; install
it with `pip install torch==2.13.0`, a CPU wheel). Prints a markdown table of
medians; ratios are against the llvm backend. Every engine runs in its own
worker process and the engines take turns, a few runs per round, so changes in
machine load hit all of them alike. numpy runs twice: with this machine's
OPENBLAS_CORETYPE and with it unset. Every engine runs on `--threads` threads (default:
the cores this process may use): TENSORC_NUM_THREADS, OPENBLAS_NUM_THREADS and
OMP_NUM_THREADS, ONNX Runtime's intra-op pool, torch.set_num_threads.
llvm runs twice: with this host's tuned schedules (`tensorc tune`, the per-host cache)
and untuned (TENSORC_TUNE_CACHE=off: every kernel on its default schedule).
`--baseline CHECKOUT` adds an "llvm (baseline)" engine running tensorc from another
source checkout (e.g. `git archive main | tar -x -C /tmp/main`), in the same rounds.
Compile times (lowering, code generation, JIT or cache load, weight packing) are
taken in fresh processes: "cold" with an empty disk cache, "cached" with it filled.
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
from engines import (  # beside this script
    answer,
    cpu_model,
    has,
    serve,
    start_engines,
    take_turns,
)

BATCH = int(os.environ.get("BENCH_BATCH", "1"))   # the parent sets it for the workers


def build(name: str, seq: int):
    import tensorc
    import tensorc.models
    model = tensorc.models.get(name, "small")
    feeds = model.example_inputs(batch=BATCH, seq=None if name == "vit" else seq)
    return model, feeds, tensorc.trace(model, **feeds)


def engine(peer: str, name: str, seq: int):
    """A zero-argument function running one inference of `name` on `peer`, or the
    reason it cannot run."""
    import tensorc
    _, feeds, g = build(name, seq)
    if peer in ("numpy", "llvm"):
        exe = tensorc.compile(g, peer, passes="O2" if peer == "llvm" else "O0")
        return lambda: exe.run(feeds)
    if peer in ("torch", "torch_compile"):
        return torch_engine(peer, g, feeds)
    if not has("onnxruntime"):
        return "onnxruntime not installed"
    try:
        from tensorc.frontend.onnx import save
    except ImportError:
        return "no ONNX export in tensorc yet"
    import onnxruntime as ort
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    save(g, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    return lambda: sess.run(None, ort_feeds)


def torch_engine(peer: str, g, feeds):
    if not has("torch"):
        return "not installed"
    import torch
    from torch_peer import torch_runner  # beside this script
    torch.set_num_threads(_threads())

    from tensorc.passes import run_pipeline
    fn = torch_runner(run_pipeline(g, "O1,fuse-attention"), torch)
    if peer == "torch_compile":
        fn = torch.compile(fn)
    args = [torch.as_tensor(feeds[v.name]) for v in g.inputs]

    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def worker(peer: str, name: str, seq: int) -> None:
    """Subprocess entry: build one engine, then answer `run N` with N times (JSON)."""
    if peer == "compile":  # lowering + codegen + JIT (or cache load), in a fresh process
        from tensorc.backends.llvm import LLVMExecutable
        from tensorc.passes import run_pipeline
        g = build(name, seq)[2]
        t = time.perf_counter()
        LLVMExecutable(run_pipeline(g, "O2")).specialise({})
        print(json.dumps(time.perf_counter() - t), flush=True)
        return
    fn = engine(peer, name, seq)
    if isinstance(fn, str):
        print(json.dumps(fn), flush=True)
        return
    fn()  # warm up
    serve(fn)


def start(peer, name, seq, env_changes: dict) -> subprocess.Popen:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.Popen([sys.executable, __file__, "--worker", peer, name, "--seq",
                             str(seq)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _threads() -> int:
    """The thread count every engine uses (the parent sets it for the workers)."""
    return int(os.environ["TENSORC_NUM_THREADS"])


def interleaved(name, seq, rounds: int, runs: int, baseline: str | None = None
                ) -> dict[str, float | str]:
    """Median ms per engine. Each engine lives in its own process (BLAS and ORT threads
    spin after a call and would slow the next engine in the same process); the engines
    take turns, a few runs each per round, so a change in machine load hits all alike.
    Each turn starts with 2 untimed runs: after the other engines' turns a core has
    dropped its clock, and the first run pays for that (ORT's spinning pool hides it,
    a sleeping pool does not), which is not what a steady stream of calls sees."""
    configs = {"llvm": ("llvm", {}), "llvm_untuned": ("llvm", {"TENSORC_TUNE_CACHE": "off"}),
               "numpy": ("numpy", {}),
               "numpy_unset": ("numpy", {"OPENBLAS_CORETYPE": None}), "ort": ("ort", {}),
               "torch": ("torch", {}), "torch_compile": ("torch_compile", {})}
    if baseline:
        configs["llvm_baseline"] = ("llvm", {"PYTHONPATH": os.path.abspath(baseline)})
    procs, result = start_engines({key: lambda peer=peer, env=env: start(peer, name, seq, env)
                                   for key, (peer, env) in configs.items()})
    times = take_turns(procs, rounds, lambda key: "run 1 0" if key.startswith("numpy")
                       else f"run {runs} 2")
    for key, answers in times.items():
        result[key] = 1000 * float(np.median(sum(answers, [])))
    return result


def compile_times(name, seq) -> list:
    with tempfile.TemporaryDirectory() as cache:  # the first run fills the cache
        return [answer(start("compile", name, seq, {"TENSORC_CACHE_DIR": cache}))
                for _ in range(2)]


def bench_model(name: str, seq: int, rounds: int, runs: int, baseline=None) -> dict:
    import tensorc
    from tensorc.backends.llvm import LLVMExecutable
    from tensorc.passes import run_pipeline
    row = {"model": name}
    row["compile_cold_s"], row["compile_cached_s"] = compile_times(name, seq)
    for key, ms in interleaved(name, seq, rounds, runs, baseline).items():
        row[key + "_ms"] = ms
    _, feeds, g = build(name, seq)
    exe = LLVMExecutable(run_pipeline(g, "O2"))
    got, want = exe.run(feeds), tensorc.compile(g, "numpy").run(feeds)
    row["rel_err"] = max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max())
                         for k in want)
    row["stats"] = exe.stats()
    return row


def fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def ratio(x, base) -> str:
    return f"{x / base:.2f}x" if isinstance(x, float) and isinstance(base, float) else "-"


def table(rows: list[dict]) -> str:
    if "llvm_baseline_ms" in rows[0]:
        lines = ["| model | llvm ms | llvm (baseline) ms |", "| --- | --- | --- |"]
        lines += [f"| {r['model']} | {fmt(r['llvm_ms'])} | {fmt(r['llvm_baseline_ms'])} "
                  f"({ratio(r['llvm_baseline_ms'], r['llvm_ms'])}) |" for r in rows]
        lines.append("")
    else:
        lines = []
    lines += ["| model | llvm ms (tuned) | llvm ms (untuned) | numpy ms (OPENBLAS_CORETYPE "
              "as set) | numpy ms (unset) | ONNX Runtime ms | PyTorch eager ms | "
              "torch.compile ms | llvm compile cold / cached s | llvm rel err |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = r["llvm_ms"]
        lines.append(
            f"| {r['model']} | {fmt(base)} "
            f"| {fmt(r['llvm_untuned_ms'])} ({ratio(r['llvm_untuned_ms'], base)}) "
            f"| {fmt(r['numpy_ms'])} ({ratio(r['numpy_ms'], base)}) "
            f"| {fmt(r['numpy_unset_ms'])} ({ratio(r['numpy_unset_ms'], base)}) "
            f"| {fmt(r['ort_ms'])} ({ratio(r['ort_ms'], base)}) "
            f"| {fmt(r['torch_ms'])} ({ratio(r['torch_ms'], base)}) "
            f"| {fmt(r['torch_compile_ms'])} ({ratio(r['torch_compile_ms'], base)}) "
            f"| {fmt(r['compile_cold_s'])} / {fmt(r['compile_cached_s'])} "
            f"| {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,bert,vit")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3, help="runs per engine per round")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every engine (default: the cores this process may use)")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also time llvm from this source checkout, in the same rounds")
    ap.add_argument("--worker", nargs=2, metavar=("PEER", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.seq)
        return
    for key in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[key] = str(args.threads)   # the workers inherit it
    global BATCH
    BATCH = args.batch
    os.environ["BENCH_BATCH"] = str(args.batch)
    rows = [bench_model(m, args.seq, args.rounds, args.runs, args.baseline)
            for m in args.models.split(",")]
    print(f"{cpu_model()}; small presets, batch {args.batch}, seq {args.seq} (vit: 197 "
          f"tokens), pipeline O2, "
          f"{args.threads} threads for every engine, medians of {args.rounds} interleaved "
          f"rounds of {args.runs} runs (numpy: 1); "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    print(table(rows))
    for r in rows:
        print(f"\n{r['model']}: {json.dumps(r['stats'])}")


if __name__ == "__main__":
    main()
