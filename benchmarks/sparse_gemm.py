"""Sparse-weight GEMM against dense (issue 15): out = A @ W for a pruned W, float32.

    .venv/bin/python benchmarks/sparse_gemm.py [--m 128] [--shapes 512x2048,2048x512]
        [--patterns unstructured,block4x1,2:4] [--sparsity 0,0.5,0.6,0.7,0.8,0.9,0.95]
        [--threads 2] [--rounds 7] [--runs 5]   (the rounds take turns: see below)

W [K, N] is N(0, 1) pruned by `sparsify-weights`' own `prune` (2:4 only at 0 and from
0.5: below that it cannot be), A [M, K] N(0, 1). Engines: `dense` tensorc's GEMM with
the weight packed once (`gemm.PackedB`, what the runtime runs for a dense weight),
`sparse` the sparse kernel (`sparse_gemm.SparseB`, packed once), `numpy` A @ W
(OpenBLAS, dense), each on --threads threads (TENSORC_NUM_THREADS and
OPENBLAS_NUM_THREADS set before numpy loads). tensorc's configurations take turns
within each round (a shared machine drifts); numpy's rounds come after them all
(OpenBLAS's threads spin after each call, holding the core tensorc's second thread
needs; a shorter spin, OPENBLAS_THREAD_TIMEOUT, made numpy 10-30x slower on a busy
machine). A cell is the median over rounds of each round's median of --runs calls.
"auto" is what the runtime picks (`sparse_gemm.pack_weight` and `bind`: sparse at
density <= `density_limit(M)`). The crossover is the sparsity, interpolated linearly
between measured points, from which sparse beats dense.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=128)
    ap.add_argument("--shapes", default="512x2048,2048x512", help="KxN,...")
    ap.add_argument("--patterns", default="unstructured,block4x1,2:4")
    ap.add_argument("--sparsity", default="0,0.5,0.6,0.7,0.8,0.9,0.95")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    for var in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tensorc.backends.llvm import gemm, sparse_gemm
    from tensorc.passes.sparse_weights import prune

    rng = np.random.default_rng(0)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    levels = [float(s) for s in args.sparsity.split(",")]
    cases = []   # (shape, pattern, sparsity, density, {engine: call}, operands kept)
    for k, n in shapes:
        a = rng.standard_normal((args.m, k)).astype(np.float32)
        w0 = rng.standard_normal((k, n)).astype(np.float32)
        for pattern in args.patterns.split(","):
            for s in levels:
                if pattern == "2:4" and 0 < s < 0.5:
                    continue
                w = prune(w0, s, pattern)
                out = [np.empty((args.m, n), np.float32) for _ in range(2)]
                calls = {
                    "dense": gemm.bind(a, gemm.PackedB(w, threads=args.threads), out[0],
                                       threads=args.threads),
                    "sparse": sparse_gemm.bind(a, sparse_gemm.SparseB(w), out[1],
                                               threads=args.threads, always=True),
                    "numpy": lambda a=a, w=w: a @ w}
                for f in calls.values():
                    f()
                    f()
                assert np.allclose(out[1], out[0], rtol=1e-4, atol=1e-3)
                d = np.count_nonzero(w) / w.size
                cases.append(((k, n), pattern, s, d, calls, (a, w, out)))   # binds hold addresses
    times: dict = {}
    for engines in (("dense", "sparse"), ("numpy",)):
        for _ in range(args.rounds):
            for i, (*_, calls, _) in enumerate(cases):
                for name in engines:
                    f = calls[name]
                    ts = []
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        f()
                        ts.append(time.perf_counter() - t)
                    times.setdefault((i, name), []).append(float(np.median(ts)))
    med = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
    print(f"M={args.m}, threads {args.threads}, medians of {args.rounds} rounds x "
          f"{args.runs} runs (ms); DENSITY_MAX={sparse_gemm.DENSITY_MAX}\n")
    print("| K x N | pattern | sparsity | density | dense | sparse | numpy | "
          "dense/sparse | auto |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    cross: dict = {}
    for i, ((k, n), pattern, s, d, _, _) in enumerate(cases):
        dn, sp, nu = med[i, "dense"], med[i, "sparse"], med[i, "numpy"]
        auto = "sparse" if d <= sparse_gemm.density_limit(args.m) else "dense"
        print(f"| {k}x{n} | {pattern} | {s:.2f} | {d:.3f} | {dn:.3f} | {sp:.3f} | "
              f"{nu:.3f} | {dn / sp:.2f}x | {auto} |")
        cross.setdefault((k, n, pattern), []).append((s, dn / sp))
    print()
    for (k, n, pattern), pts in cross.items():
        found = None
        for (s0, r0), (s1, r1) in zip(pts, pts[1:], strict=False):
            if r0 < 1 <= r1:
                found = s0 + (1 - r0) * (s1 - s0) / (r1 - r0)
                break
        where = f"{found:.2f}" if found is not None else \
            ("below the first point" if pts[0][1] >= 1 else "not reached")
        print(f"crossover {k}x{n} {pattern}: sparse faster from sparsity {where}")


if __name__ == "__main__":
    main()
