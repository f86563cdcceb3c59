"""Sparse and linear attention against dense (issue 14): time and peak memory over
sequence length, LLVM backend, float32, b1 h8 d64.

    .venv/bin/python benchmarks/attention.py [--seqs 512,1024,2048,4096,8192,16384]
        [--window 256] [--block 64] [--features 256] [--causal both|yes|no]
        [--rounds 3] [--runs 3] [--threads 2] [--plot benchmarks/attention.png]
    .venv/bin/python benchmarks/attention.py --quality CHECKPOINT

`--quality` instead measures what the rewrites cost a trained model (a `tensorc train`
checkpoint, e.g. tools/train_checkpoints.py's GPT): held-out perplexity and next-token
agreement with the dense model for `sparsify-attention` and `linearize-attention`
variants (benchmarks/quant.py's `accuracy`), at the checkpoint's own length.

Engines, each in its own worker process, taking turns (benchmarks/engines.py):
`dense` tensorc's flash-attention kernel (the `attention` op), `local`
(`local_attention`, a window of --window keys: causal, the keys up to the query; else
half each side), `block` (`block_sparse_attention`, blocks of --block positions and
one neighbour block each side), `performer` (`linear_attention`, --features random
features), each a one-node graph compiled on llvm (no fallback: the script stops if
one runs on numpy); `numpy` softmax(q k^T * scale) v unfused, materialising the
scores (up to seq 8192: at 16384 they take 8.6 GB); `torch` PyTorch's
scaled_dot_product_attention (dense, its CPU flash kernel), the peer, when torch is
installed (`pip install torch==2.13.0`). Every engine runs on --threads threads
(TENSORC_NUM_THREADS, OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, torch.set_num_threads).

q and k entries are N(0, 0.5^2) (scores q.k / sqrt(d) of std 0.25), v N(0, 1): with
unit q and k (scores of std 1) Performer's error is several times larger (its
estimator's variance grows as exp(|q|^2 + |k|^2) / sqrt(d)); the trained-model row of
benchmarks/README.md gives its cost on real activations.

A cell is the median of --runs timed calls in each of --rounds rounds (after two
untimed ones per turn). "peak MiB" is the worker's resident-set high-water mark
during the timed calls above what it held before them (inputs, output and compiled
code already resident: /proc/self/clear_refs resets the mark). "err" is the
performer's mean |out - dense| / mean |dense| on these random inputs (local and block
compute their own pattern exactly: they differ from dense by design). The plot draws
time against sequence length for every engine, log-log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
from engines import cpu_model, has, serve, start_engines, take_turns  # beside this script

B, H, D = 1, 8, 64
QK_STD = 0.5   # the spread of q and k entries (Performer's error grows fast with it)
NUMPY_MAX_SEQ = 8192


QUALITY = {"dense": "O2",
           "local, window 16": "O2,sparsify-attention:window=16",
           "local, window 32": "O2,sparsify-attention:window=32",
           "local, window 32, 1 global token": "O2,sparsify-attention:window=32:global=1",
           "block 16, 1 neighbour": "O2,sparsify-attention:block=16",
           "block 16, 1 neighbour, 1 random": "O2,sparsify-attention:block=16:random=1:always=1",
           "performer, 64 features": "O2,linearize-attention:features=64:always=1",
           "performer, 256 features": "O2,linearize-attention:features=256:always=1",
           "performer, 1024 features": "O2,linearize-attention:features=1024:always=1"}


def inputs(seq: int):
    """q, k scaled by QK_STD, v unit normal (see the module docstring)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, seq, D), dtype=np.float32) for _ in range(3))
    return [q * np.float32(QK_STD), k * np.float32(QK_STD), v]


def node(kind: str, causal: bool, a: argparse.Namespace):
    """(op, attrs, extra inputs) of one engine."""
    from tensorc.ops.sparse_attention import performer_features, window_attrs
    scale = 1 / math.sqrt(D)
    if kind == "dense":
        return "attention", {"scale": scale, "causal": causal}, []
    if kind == "local":
        return "local_attention", {"scale": scale, "causal": causal,
                                   **window_attrs(a.window, causal)}, []
    if kind == "block":
        return "block_sparse_attention", {"scale": scale, "causal": causal,
                                          "block": a.block}, []
    return "linear_attention", {"scale": scale, "causal": causal}, \
        [performer_features(D, a.features, 0)]


def tensorc_engine(kind: str, seq: int, causal: bool, a):
    import tensorc
    from tensorc.ir import Graph, TensorType
    op, attrs, extra = node(kind, causal, a)

    def compiled(n):
        g = Graph(kind)
        xs = [g.add_input(f"x{i}", TensorType((B, H, n, D))) for i in range(3)]
        consts = [g.add_constant(f"c{i}", c) for i, c in enumerate(extra)]
        g.outputs = [g.add(op, *xs, *consts, **attrs)]
        return tensorc.compile(g, "llvm")
    small = compiled(64)   # compiles the kernels before the memory baseline
    small(*inputs(64))
    fallbacks = small.stats().get("fallbacks")
    if fallbacks:
        raise SystemExit(f"{kind} runs on numpy: {fallbacks}")
    exe = compiled(seq)
    q, k, v = inputs(seq)
    return lambda: exe(q, k, v)


def numpy_engine(seq: int, causal: bool):
    q, k, v = inputs(seq)
    scale = np.float32(1 / math.sqrt(D))
    tri = np.tri(seq, dtype=bool) if causal else None

    def run():
        s = (q @ k.transpose(0, 1, 3, 2)) * scale
        if causal:
            s = np.where(tri, s, np.float32(-np.inf))
        s = np.exp(s - s.max(-1, keepdims=True))
        return (s / s.sum(-1, keepdims=True)) @ v
    return run


def torch_engine(seq: int, causal: bool):
    import torch
    torch.set_num_threads(int(os.environ["TENSORC_NUM_THREADS"]))
    q, k, v = (torch.from_numpy(x) for x in inputs(seq))

    def run():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def worker(kind: str, seq: int, causal: bool, a) -> None:
    if kind == "numpy":
        fn = numpy_engine(seq, causal)
    elif kind == "torch":
        fn = torch_engine(seq, causal)
    else:
        fn = tensorc_engine(kind, seq, causal, a)
    base = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset the high-water mark
    fn()   # the first call: tensorc binds (workspaces, output) here
    serve(fn, {"peak": _rss("VmHWM") - base})


def start(kind, seq, causal, a) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", kind, "--seqs", str(seq), "--causal",
           "yes" if causal else "no", "--window", str(a.window), "--block", str(a.block),
           "--features", str(a.features)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def performer_error(seq: int, causal: bool, a) -> float:
    """mean |performer - dense| / mean |dense| on the benchmark's inputs (the llvm
    kernels, which match the references to ~1e-6)."""
    from tensorc.backends.llvm.attention import attention
    from tensorc.backends.llvm.linear_attention import linear_attention
    from tensorc.ops.sparse_attention import performer_features
    q, k, v = inputs(seq)
    dense = attention(q, k, v, scale=1 / math.sqrt(D), causal=causal)
    approx = linear_attention(q, k, v, performer_features(D, a.features, 0),
                              scale=1 / math.sqrt(D), causal=causal)
    return float(np.abs(approx - dense).mean() / np.abs(dense).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default="benchmarks/attention.png")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--quality", nargs="+", default=None, metavar="CHECKPOINT")
    a = ap.parse_args()
    if a.quality:
        from quant import accuracy  # beside this script
        print(json.dumps(accuracy(a.quality, variants=QUALITY), indent=1))
        return
    causals = {"both": [False, True], "yes": [True], "no": [False]}[a.causal]
    if a.worker:
        worker(a.worker, int(a.seqs), causals[0], a)
        return
    for var in ("TENSORC_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import tensorc
    kinds = ["dense", "local", "block", "performer", "numpy"] + (["torch"] if has("torch")
                                                                else [])
    print(f"CPU: {cpu_model()}; {a.threads} threads every engine; tensorc at "
          f"{os.path.dirname(tensorc.__file__)}"
          + ("" if has("torch") else "; torch not installed (no peer)"))
    print(f"b{B} h{H} d{D} float32; local window {a.window}, block {a.block} (one neighbour "
          f"each side), performer {a.features} features; median of {a.runs} x {a.rounds} "
          "calls\n")
    print("| seq | causal | " + " | ".join(f"{k} ms" for k in kinds)
          + " | dense / local | dense / block | dense / performer | "
          + " | ".join(f"{k} peak MiB" for k in kinds) + " | performer err |")
    print("| --- | --- |" + " ---: |" * (2 * len(kinds) + 4))
    curves: dict[tuple, list] = {}
    for causal in causals:
        for seq in (int(s) for s in a.seqs.split(",")):
            run_kinds = [k for k in kinds if k != "numpy" or seq <= NUMPY_MAX_SEQ]
            procs, failed = start_engines({k: lambda k=k, n=seq, c=causal: start(k, n, c, a)
                                           for k in run_kinds})
            got = take_turns(procs, a.rounds, lambda k: f"run {a.runs} 2")
            ms, peak = {}, {}
            for k in kinds:
                if k in got:
                    ms[k] = 1e3 * float(np.median([t for r in got[k] for t in r["times"]]))
                    peak[k] = max(r["peak"] for r in got[k]) / 2**20
                    curves.setdefault((k, causal), []).append((seq, ms[k]))
            cells = [f"{ms[k]:.2f}" if k in ms else failed.get(k, "-") for k in kinds]
            ratios = [f"{ms['dense'] / ms[k]:.2f}x" if k in ms and "dense" in ms else "-"
                      for k in ("local", "block", "performer")]
            mem = [f"{peak[k]:.1f}" if k in peak else "-" for k in kinds]
            err = performer_error(seq, causal, a)
            print(f"| {seq} | {'yes' if causal else 'no'} | " + " | ".join(cells + ratios + mem)
                  + f" | {err:.3f} |", flush=True)
    if a.plot and has("matplotlib"):
        plot(curves, a)


def plot(curves: dict, a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, causal in zip(axes, (False, True), strict=True):
        for (kind, c), pts in sorted(curves.items()):
            if c == causal:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(f"{'causal' if causal else 'non-causal'}: b{B} h{H} d{D}, "
                     f"window {a.window}, block {a.block}, {a.features} features")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per call (median)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=90)
    print(f"\nplot: {a.plot}")


if __name__ == "__main__":
    main()
