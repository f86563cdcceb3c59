"""bf16 weights (issue 13): GPT small on the LLVM backend, float32 weights vs
`cast-weights:bf16`, latency and logit error.

    .venv/bin/python benchmarks/bf16.py [--shapes 1x128,1x1] [--runs 30] [--rounds 5]
        [--threads 2] [--model gpt] [--preset small]

Both variants are compiled in this process (O2, and O2,cast-weights:bf16) from the
same traced graph, warmed up, then take turns: each round times --runs calls of one,
then of the other; a cell is the median over all its calls (>= runs x rounds). The
error is the bf16 variant's logits against the f32 variant's (same backend, same
inputs): the largest absolute difference, and that over the largest |logit|.
"weights" is the bytes of constant data each graph holds (all of them: biases, layer
norms and the tied embedding stay f32); "packed" the bytes of the GEMM's packed
weight panels once bound (what a call streams).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x128,1x1", help="batch x seq, comma separated")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    os.environ["TENSORC_NUM_THREADS"] = str(args.threads)

    import numpy as np

    import tensorc
    import tensorc.models
    from tensorc.passes import run_pipeline

    model = tensorc.models.get(args.model, args.preset)
    print(f"{args.model} {args.preset}, llvm, {args.threads} threads; "
          f"median of {args.runs} x {args.rounds} calls after warm-up")
    print("| shape | weights | stored MiB | packed MiB | latency ms | vs f32 "
          "| max abs logit err | rel (/ max abs logit) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        feeds = model.example_inputs(batch=batch, seq=seq)
        g = tensorc.trace(model, **feeds)
        graphs = {"f32": run_pipeline(g, "O2"), "bf16": run_pipeline(g, "O2,cast-weights:bf16")}
        exes = {k: _llvm(v) for k, v in graphs.items()}
        outs = {k: exe(**feeds)[0] for k, exe in exes.items()}
        for exe in exes.values():   # warm-up
            for _ in range(5):
                exe(**feeds)
        times: dict[str, list[float]] = {k: [] for k in exes}
        for _ in range(args.rounds):
            for k, exe in exes.items():
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    exe(**feeds)
                    times[k].append(time.perf_counter() - t0)
        ref = outs["f32"].astype(np.float64)
        base = statistics.median(times["f32"])
        for k in exes:
            stored = sum(v.data.nbytes for v in graphs[k].constants.values()) / 2**20
            packed = _packed_bytes(exes[k]) / 2**20
            ms = statistics.median(times[k])
            d = np.abs(outs[k].astype(np.float64) - ref).max()
            print(f"| b{batch} s{seq} | {k} | {stored:.1f} | {packed:.1f} | {ms * 1e3:.2f} "
                  f"| {ms / base:.2f}x | {d:.3g} | {d / np.abs(ref).max():.2e} |")


def _llvm(graph):
    from tensorc.backends import get_backend
    return get_backend("llvm").compile(graph)


def _packed_bytes(exe) -> int:
    """Bytes of the PackedB panels of the executable's bound runners."""
    return sum(p.data.nbytes for r in exe._runners.values() for p in r._packed.values())


if __name__ == "__main__":
    main()
