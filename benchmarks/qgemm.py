"""INT8 GEMM (backends/llvm/qgemm.py) per code path vs tensorc's float32 GEMM (a
PackedB weight) and numpy's float32 matmul, on GPT small's shapes.

    python benchmarks/qgemm.py [--threads 2] [--repeats 31] [--rounds 3] [--rows 128 1]

Prints, per shape, GOP/s (2 M K N operations per product, from the median time) of
numpy, tensorc's float32 GEMM with a bias, and per int8 path the plain int32 product
and, as a quantised linear layer runs it, the one with row and column scales and a
bias (float32 out), with its speed-up over tensorc's float32 GEMM."""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np

SHAPES = [(512, 1536), (512, 512), (512, 2048), (2048, 512), (512, 8192)]


def median_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 1])
    ap.add_argument("--paths", nargs="+", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from tensorc.backends.llvm import gemm as G
    from tensorc.backends.llvm import qgemm as Q

    paths = args.paths or Q.host_paths()
    rng = np.random.default_rng(0)
    cases = []
    for m in args.rows:
        for k, n in SHAPES:
            cases.append((m, k, n, rng.standard_normal((m, k), dtype=np.float32),
                          rng.standard_normal((k, n), dtype=np.float32),
                          rng.integers(0, 256, (m, k), dtype=np.uint8),
                          rng.integers(-128, 128, (k, n), dtype=np.int8),
                          rng.random(m, dtype=np.float32), rng.random(n, dtype=np.float32),
                          rng.standard_normal(n, dtype=np.float32)))
    # numpy first, all shapes: its BLAS threads spin after each call, and on a small
    # machine they and the pool's spinning workers would slow each other down. Each cell
    # keeps its best median over --rounds rounds (load bursts from other jobs).
    best: dict = {}

    def note(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)
    for _ in range(args.rounds):
        for m, k, n, a, w, *_ in cases:
            out = np.empty((m, n), np.float32)
            note(("np", m, k, n), median_time(functools.partial(np.matmul, a, w, out=out),
                                              args.repeats))
    time.sleep(1.0)
    bound = {}
    for m, k, n, a, w, qa, qb, rs, cs, bias in cases:
        out = np.empty((m, n), np.float32)
        bound["tc", m, k, n] = G.bind(a, G.PackedB(w, threads=args.threads), out, bias=bias,
                                      threads=args.threads)
        for p in paths:
            pb = Q.PackedQB(qb, path=p)
            o32 = np.empty((m, n), np.int32)
            bound[p + " i32", m, k, n] = Q.bind(qa, pb, o32, a_zero=128,
                                                threads=args.threads, path=p)
            bound[p + " f32", m, k, n] = Q.bind(qa, pb, out, a_zero=128, row_scale=rs,
                                                col_scale=cs, bias=bias,
                                                threads=args.threads, path=p)
    for _ in range(args.rounds):
        for key, run in bound.items():
            note(key, median_time(run, args.repeats))
    print(f"threads {args.threads}, paths {paths}, medians of {args.repeats}, "
          f"best of {args.rounds} rounds")
    head = f"{'M':>4} {'K':>5} {'N':>5} | {'np f32':>7} {'tc f32':>7} |"
    for p in paths:
        head += f" {p + ' i32':>12} {p + ' f32':>12} {'x':>5} |"
    print(head + "   (GOP/s; x: int8 with scales and bias vs tc f32)")
    for m, k, n, *_ in cases:
        g = 2 * m * k * n / 1e9
        t_tc = best["tc", m, k, n]
        line = f"{m:>4} {k:>5} {n:>5} | {g / best['np', m, k, n]:7.1f} {g / t_tc:7.1f} |"
        for p in paths:
            t_i, t_f = best[p + " i32", m, k, n], best[p + " f32", m, k, n]
            line += f" {g / t_i:12.1f} {g / t_f:12.1f} {t_tc / t_f:5.2f} |"
        print(line, flush=True)

if __name__ == "__main__":
    main()
