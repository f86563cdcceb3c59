"""Decode-shaped kernels (one generated token of GPT small) against memory bandwidth.

    .venv/bin/python benchmarks/decode_kernels.py [--threads 2] [--rounds 3] [--repeat 50]
        [--baseline CHECKOUT] [--no-attention]

In a KV-cache decode step every matmul has M = batch rows (1..8) and reads its whole
weight once, so its floor is weight bytes / memory bandwidth. This prints:

- the machine (CPU model from lscpu), the thread count (pinned: TENSORC_NUM_THREADS,
  OPENBLAS_NUM_THREADS, OMP_NUM_THREADS) and the streaming-read bandwidth measured by
  `bandwidth.py` (numpy, 512 MiB, those threads);
- per matmul shape of GPT small (d 512, d_ff 2048, vocab 8192; the logits as
  `x @ E.T`, the tied embedding) and M in 1, 2, 4, 8: tensorc llvm running a traced
  graph `x @ W` (W a weight constant, packed once at compile time), in ms, in GB/s of
  weight bytes per call and as a share of the bandwidth, and numpy `x @ W`. These
  weights (1 to 16 MiB) stay in the caches between calls: they measure the kernel;
- the whole decode step's matmuls in one graph (6 layers of qkv, out-proj, mlp up
  with gelu, mlp down with the residual, then the logits: 92 MB of weights, more than
  the L2s hold), the figure a token's latency is bounded by;
- the decode step's matmuls and GPT small's forward at seq 1, compiled twice in one
  process with the GEMV path and the decode attention kernel off and on, taking turns
  in blocks of 12 calls (the fairest comparison on a shared machine);
- flash attention (`backends/llvm/attention.py`, bound once as the runtime runs it)
  with t = 1 query row, 8 heads of 64, s cached keys, batch 1 and 4, without and with
  a bool keep-mask [b, 1, 1, s], against numpy's unfused softmax(q k^T) v; GB/s counts
  the K and V bytes.

Every engine runs in its own subprocess (numpy's OpenBLAS threads keep spinning after
a call), the engines take turns for --rounds rounds, a cell is the median of --repeat
calls, and each cell keeps its best round: the machine is shared, and a burst of load
from elsewhere should not decide a comparison. `--baseline CHECKOUT` adds tensorc from
another source checkout (e.g. `git archive main | tar -x -C /tmp/main`) to the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from engines import cpu_model  # beside this script

D, DFF, VOCAB, LAYERS = 512, 2048, 8192, 6
# (name, K, N): the decode step's matmuls; "logits" is x @ E.T with E [VOCAB, D]
GEMMS = [("qkv", D, 3 * D), ("out-proj", D, D), ("mlp up", D, DFF), ("mlp down", DFF, D),
         ("logits (E.T)", D, VOCAB)]
ROWS = (1, 2, 4, 8)
# (batch, heads, s, d) with one query row
ATTN = [(b, 8, s, 64) for b in (1, 4) for s in (16, 128, 512, 1024)]


def median_seconds(repeat: int, fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def weights(k: int, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((k, n), np.float32)
            * np.float32(k ** -0.5))


def gemm_graph(name: str, k: int, n: int, m: int):
    """(traced function, x, W as numpy multiplies it) for one matmul shape."""
    x = np.random.default_rng(1).standard_normal((m, k), np.float32)
    if name.startswith("logits"):
        # the tied embedding [vocab, d], transposed in the graph as GPT's forward does
        from tensorc.frontend.tensor import Tensor
        emb = weights(n, k)
        return (lambda x: x @ Tensor(emb).T), x, emb.T
    w = weights(k, n)
    return (lambda x: x @ w), x, w


def chain(m: int):
    """The decode step's matmuls, 6 layers then the logits, as one function."""
    import tensorc.frontend.functional as F
    from tensorc.frontend.tensor import Tensor
    ws = [[weights(k, n, seed=10 * layer + i) for i, (_, k, n) in enumerate(GEMMS[:4])]
          for layer in range(LAYERS)]
    emb = weights(VOCAB, D, seed=99)

    def step(x):
        for wqkv, wo, w1, w2 in ws:
            h = (x @ wqkv)[:, :D] @ wo + x
            x = F.gelu(h @ w1) @ w2 + h
        return x @ Tensor(emb).T
    nbytes = sum(w.nbytes for layer in ws for w in layer) + emb.nbytes
    return step, np.random.default_rng(1).standard_normal((m, D), np.float32), nbytes


def attn_operands(b, h, s, d):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, 1, d), np.float32)
    k, v = (rng.standard_normal((b, h, s, d), np.float32) for _ in range(2))
    mask = np.ones((b, 1, 1, s), bool)
    mask[:, :, :, s // 2::3] = False   # some keys masked out, as padding would be
    return q, k, v, mask


def numpy_attention(q, k, v, mask):
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(0.125)
    if mask is not None:
        s = np.where(mask, s, np.float32(-np.inf))
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


# -- workers: each runs in its own process and prints one JSON line --------------------

def worker_tensorc(repeat: int) -> dict:
    import tensorc
    from tensorc.backends.llvm import attention
    out = {"gemm": [], "chain": [], "attention": [], "err": 0.0}
    for name, k, n in GEMMS:
        for m in ROWS:
            fn, x, w = gemm_graph(name, k, n, m)
            exe = tensorc.compile(tensorc.trace(fn, x=x), "llvm", passes="O2")
            want = x.astype(np.float64) @ w
            err = np.abs(exe(x) - want).max() / np.abs(want).max()
            out["err"] = max(out["err"], float(err))
            out["gemm"].append(median_seconds(repeat, lambda exe=exe, x=x: exe(x)))
    for m in ROWS:
        fn, x, _ = chain(m)
        exe = tensorc.compile(tensorc.trace(fn, x=x), "llvm", passes="O2")
        out["chain"].append(median_seconds(max(5, repeat // 2), lambda exe=exe, x=x: exe(x)))
    for shape in ATTN:
        q, k, v, mask = attn_operands(*shape)
        for m in (None, mask):
            o = np.empty(q.shape, np.float32)
            run = attention.bind(q, k, v, m, scale=0.125, out=o)
            run()
            want = numpy_attention(q.astype(np.float64), k, v, m)
            out["err"] = max(out["err"], float(np.abs(o - want).max() / np.abs(want).max()))
            out["attention"].append(median_seconds(repeat, run))
    return out


def worker_numpy(repeat: int) -> dict:
    out = {"gemm": [], "chain": [], "attention": []}
    for name, k, n in GEMMS:
        for m in ROWS:
            _, x, w = gemm_graph(name, k, n, m)
            out["gemm"].append(median_seconds(repeat, lambda x=x, w=w: x @ w))
    for shape in ATTN:
        q, k, v, mask = attn_operands(*shape)
        for m in (None, mask):
            out["attention"].append(median_seconds(repeat, lambda q=q, k=k, v=v, m=m:
                                                   numpy_attention(q, k, v, m)))
    return out


def worker_paths(repeat: int) -> dict:
    """The decode step's matmuls and GPT small at batch 1, seq 1 (a decode step without
    the cache: 92 MB of weights, attention over one key), each compiled twice in this
    process, with the GEMV path and the decode attention kernel switched off (the
    packed GEMM, the flash blocks) and on; the two take turns in blocks of calls, so
    that the machine's load hits both alike. Medians."""
    import tensorc
    import tensorc.models
    from tensorc.backends.llvm import attention_schedule, gemv

    def compiled(g, on: bool):
        gemv.GEMV_MAX_M, attention_schedule.DECODE_T = (8, 4) if on else (0, 0)
        try:
            return tensorc.compile(g, "llvm", passes="O2")
        finally:
            gemv.GEMV_MAX_M, attention_schedule.DECODE_T = 8, 4
    fn, x, _ = chain(1)
    model = tensorc.models.get("gpt", "small")
    feeds = model.example_inputs(batch=1, seq=1)
    out = {}
    for name, g, call in (("chain", tensorc.trace(fn, x=x), lambda e: e(x)),
                          ("gpt", tensorc.trace(model, **feeds), lambda e: e.run(feeds))):
        exes = [compiled(g, False), compiled(g, True)]
        times = [[], []]
        for _ in range(max(1, repeat // 10)):   # blocks of 12 calls, the first 2 not timed:
            for j, exe in enumerate(exes):     # each block finds its own weights in L3
                for i in range(12):            # as far as they fit (92 MB each)
                    t0 = time.perf_counter()
                    call(exe)
                    if i >= 2:
                        times[j].append(time.perf_counter() - t0)
        out[name] = [float(np.median(t)) for t in times]
    return out


WORKERS = {"tensorc": worker_tensorc, "numpy": worker_numpy, "paths": worker_paths}


def run_worker(kind: str, repeat: int, env: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--repeat", str(repeat)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[{kind} worker failed: {last}]", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(results: list[dict]) -> dict | None:
    """Per cell, the best (lowest) time over the rounds."""
    if not results:
        return None
    out = dict(results[0])
    for key, val in out.items():
        if isinstance(val, list) and val:
            out[key] = [min(cells) for cells in zip(*(r[key] for r in results), strict=True)]
    out["err"] = max(r.get("err", 0.0) for r in results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept")
    ap.add_argument("--repeat", type=int, default=50, help="timed calls per cell (median)")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also run tensorc from this source checkout")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.repeat)))
        return
    for var in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bandwidth import read_bandwidth

    env = dict(os.environ)
    runs = {"tc": ("tensorc", env), "np": ("numpy", env), "paths": ("paths", env)}
    if args.baseline:
        runs["base"] = ("tensorc", {**env, "PYTHONPATH": os.path.abspath(args.baseline)})
    rounds = {key: [] for key in runs}
    bws = []
    order = list(runs)
    for r in range(args.rounds):   # each round starts with the next engine
        bws.append(read_bandwidth(512, args.threads))
        for key in order[r % len(order):] + order[:r % len(order)]:
            kind, e = runs[key]
            res = run_worker(kind, args.repeat, e)
            if res is not None:
                rounds[key].append(res)
    tc, npy, base = best(rounds["tc"]), best(rounds["np"]), best(rounds.get("base", []))
    paths = best(rounds["paths"])
    if tc is None or npy is None:
        sys.exit("a worker failed")
    bw = max(bws)
    print(f"CPU: {cpu_model()}; threads: {args.threads} (TENSORC_NUM_THREADS, "
          f"OPENBLAS_NUM_THREADS, OMP_NUM_THREADS)")
    print(f"streaming read bandwidth (bandwidth.py, numpy, 512 MiB, {args.threads} threads): "
          f"{bw:.1f} GB/s (best of {len(bws)}: {', '.join(f'{x:.1f}' for x in bws)})")
    print(f"max relative error of tensorc against float64: {tc['err']:.1e}")
    print(f"medians of {args.repeat} calls, best of {args.rounds} interleaved rounds")
    print()
    bcol = " | baseline ms | baseline GB/s" if base else ""
    print(f"| matmul (M x K x N) | tensorc ms | GB/s | % of bandwidth{bcol} | numpy ms "
          "| numpy GB/s |")
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if base else "") + " ---: | ---: |")
    i = 0
    for name, k, n in GEMMS:
        nbytes = k * n * 4
        for m in ROWS:
            t, tn = tc["gemm"][i], npy["gemm"][i]
            extra = f" | {base['gemm'][i] * 1e3:.3f} | {nbytes / base['gemm'][i] / 1e9:.1f}" \
                if base else ""
            print(f"| {name} {m} x {k} x {n} | {t * 1e3:.3f} | {nbytes / t / 1e9:.1f} | "
                  f"{nbytes / t / 1e9 / bw:.0%}{extra} | {tn * 1e3:.3f} | "
                  f"{nbytes / tn / 1e9:.1f} |")
            i += 1
    print()
    nbytes = chain(1)[2]
    print(f"decode step's matmuls in one graph ({LAYERS} layers + logits, "
          f"{nbytes / 1e6:.1f} MB of weights)")
    print()
    print(f"| M | tensorc ms | GB/s | % of bandwidth{bcol} |")
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if base else ""))
    for i, m in enumerate(ROWS):
        t = tc["chain"][i]
        extra = f" | {base['chain'][i] * 1e3:.2f} | {nbytes / base['chain'][i] / 1e9:.1f}" \
            if base else ""
        print(f"| {m} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {nbytes / t / 1e9 / bw:.0%}"
              f"{extra} |")
    if paths:
        print()
        print("the same process, compiled twice, taking turns in blocks of 12 calls: GEMV "
              "path and decode attention off (packed GEMM, flash blocks) and on; GPT small "
              "is batch 1, seq 1")
        print()
        print("| graph | off ms | on ms | on / off |")
        print("| --- | ---: | ---: | ---: |")
        for key, label in (("chain", "decode step's matmuls, M = 1"),
                           ("gpt", "GPT small forward, seq 1")):
            off, on = paths[key]
            print(f"| {label} | {off * 1e3:.2f} | {on * 1e3:.2f} | {on / off:.2f} |")
    print()
    print("attention, one query row (t = 1), scale 1/8; GB/s of K and V read")
    print()
    print(f"| b x h x s x d | mask | tensorc ms | GB/s{bcol} | numpy ms |")
    print("| --- | --- | ---: | ---: |" + (" ---: | ---: |" if base else "") + " ---: |")
    j = 0
    for b, h, s, d in ATTN:
        nbytes = 2 * b * h * s * d * 4
        for mask in ("none", f"bool [{b},1,1,{s}]"):
            t, tn = tc["attention"][j], npy["attention"][j]
            extra = f" | {base['attention'][j] * 1e3:.3f} | " \
                f"{nbytes / base['attention'][j] / 1e9:.1f}" if base else ""
            print(f"| {b} x {h} x {s} x {d} | {mask} | {t * 1e3:.3f} | "
                  f"{nbytes / t / 1e9:.1f}{extra} | {tn * 1e3:.3f} |")
            j += 1


if __name__ == "__main__":
    main()
