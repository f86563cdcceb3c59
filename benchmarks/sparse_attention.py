"""Sparse attention kernels (`backends/llvm/sparse_attention.py`) against dense flash
attention (`backends/llvm/attention.py`) on the same inputs, LLVM backend, float32.

    .venv/bin/python benchmarks/sparse_attention.py [--threads 2] [--rounds 7]
        [--seq 1024 2048 4096] [--heads 8] [--dim 64] [--window 256] [--block 64]

Per sequence length (batch 1): dense non-causal and causal, local_attention with a
window of `window` keys centred (before = after = window / 2) and causal (before =
window - 1, after = 0), block_sparse_attention (block, local_blocks 1). Every kernel is
bound once (as the runtime runs it); they take turns for --rounds rounds (the machine
may be shared) and a cell is the median. The ratios: dense / local (non-causal),
dense causal / local causal, dense / block sparse.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from tensorc.backends.llvm.attention import attention
from tensorc.backends.llvm.sparse_attention import bind
from tensorc.ops import get_op


def attrs(op: str, **given) -> dict:
    return {**{n: a.default for n, a in get_op(op).attrs.items() if a.default is not None},
            **given}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=64)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    scale, th, w = a.dim ** -0.5, a.threads, a.window
    print(f"b1 h{a.heads} d{a.dim} float32, {th} threads, median of {a.rounds} (ms)")
    for t in a.seq:
        q, k, v = (rng.standard_normal((1, a.heads, t, a.dim), dtype=np.float32)
                   for _ in range(3))
        out = np.empty_like(q)
        runs = {"dense": partial(attention, q, k, v, scale=scale, threads=th, out=out),
                "dense causal": partial(attention, q, k, v, scale=scale, causal=True,
                                        threads=th, out=out)}
        sparse = {f"local w{w}": ("local_attention", dict(before=w // 2, after=w // 2)),
                  f"local causal w{w}": ("local_attention", dict(before=w - 1, causal=True)),
                  f"block{a.block}": ("block_sparse_attention", dict(block=a.block))}
        for name, (op, given) in sparse.items():
            runs[name] = bind(op, q, k, v, out=out, threads=th,
                              **attrs(op, scale=scale, **given))
        times = {n: [] for n in runs}
        for fn in runs.values():
            fn()
        for _ in range(a.rounds):
            for n, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
        ms = {n: 1e3 * float(np.median(x)) for n, x in times.items()}
        names = list(ms)
        print(f"seq {t}: " + ", ".join(f"{n} {ms[n]:.2f}" for n in names)
              + f" | dense/local {ms['dense'] / ms[names[2]]:.1f}x, causal "
              f"{ms['dense causal'] / ms[names[3]]:.1f}x, dense/block "
              f"{ms['dense'] / ms[names[4]]:.1f}x", flush=True)


if __name__ == "__main__":
    main()
