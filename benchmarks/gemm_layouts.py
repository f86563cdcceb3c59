"""The LLVM GEMM on the operand layouts a training step gives it, bound as the runtime
binds them (`gemm.bind`), against a weight packed once:

    .venv/bin/python benchmarks/gemm_layouts.py [--threads 2] [--repeat 30] [--cold]
        [--no-blocks] [MxKxN ...]

Modes per shape, called in turn in one process (so that machine load hits them alike):
packed (B a `PackedB`, inference's constant weight), plain (B an activation or a
weight that is a graph input, packed on every call), bt (B = W^T, a transposed view
of a row-major W), at (A = x^T, a weight gradient's x^T @ dy). Prints the min and the
median milliseconds of each. --cold writes 256 MB between calls (training's operands
come from memory); --no-blocks sets `gemm.PACK_IN_BLOCKS = False` (a per-call B is then
always packed before the product). Shapes default to GPT small's at 128 and 1024
tokens (d 512, d_ff 2048, vocab 8192).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SHAPES = ["128x2048x512", "128x512x2048", "128x512x512", "128x512x8192", "128x8192x512",
          "512x128x512", "512x128x2048", "2048x128x512", "8192x128x512",
          "1024x2048x512", "1024x512x2048"]
MODES = ("packed", "plain", "bt", "at")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=SHAPES)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--no-blocks", action="store_true")
    args = ap.parse_args()
    os.environ["TENSORC_NUM_THREADS"] = str(args.threads)
    from tensorc.backends.llvm import gemm as G
    if args.no_blocks:
        G.PACK_IN_BLOCKS = False
    rng = np.random.default_rng(0)
    junk = np.ones(64 << 20, np.float32) if args.cold else None
    print(f"{args.threads} threads, min / median ms of {args.repeat} calls each"
          + (", cold caches" if args.cold else ""))
    for shape in args.shapes:
        m, k, n = map(int, shape.split("x"))
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        want = a.astype(np.float64) @ b
        runs = []
        for mode in MODES:
            aa = np.ascontiguousarray(a.T).T if mode == "at" else a
            bb = {"packed": G.PackedB(b), "bt": np.ascontiguousarray(b.T).T}.get(mode, b)
            out = G.aligned_empty(m * n).reshape(m, n)
            run = G.bind(aa, bb, out, threads=args.threads)
            run()
            err = np.abs(out - want).max() / np.abs(want).max()
            assert err < 1e-4, f"{mode} {shape}: relative error {err:.1e}"
            runs.append((run, aa, bb, out))   # the run reads and writes these arrays
        times = [[] for _ in runs]
        for _ in range(args.repeat):
            for i, (run, *_) in enumerate(runs):
                if junk is not None:
                    junk += 1
                t0 = time.perf_counter()
                run()
                times[i].append(time.perf_counter() - t0)
        print(f"{shape:>14}  " + "  ".join(
            f"{mode} {min(t) * 1e3:7.3f} / {np.median(t) * 1e3:7.3f}"
            for mode, t in zip(MODES, times, strict=True)))


if __name__ == "__main__":
    main()
