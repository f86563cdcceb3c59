"""GPU latency: tensorc cupy vs PyTorch eager and torch.compile, same weights.

    .venv/bin/python benchmarks/gpu.py [--models gpt,bert,vit] [--batches 1,8]
                                       [--seqs 128,1024] [--runs 30]

Small presets. Every peer runs the same traced tensorc graph with the same weights:
tensorc through its cupy backend (O2: fused regions, cuBLAS GEMMs with fused
epilogues, the flash-attention kernel, CUDA-graph replay); PyTorch through a small
interpreter of the graph (`torch_runner`) whose ops are torch calls, attention
being `scaled_dot_product_attention`; torch.compile compiles that interpreter
(dynamo unrolls the node loop into one FX graph). Inputs and outputs stay on the
device for every peer; each median is over `--runs` calls, synchronised. float32
with TF32 off everywhere, and each peer's error against the numpy reference is
printed, so the rows compare equal work at equal precision.

Then the attention kernel alone: tensorc's flash kernel vs torch SDPA, TFLOP/s.

It needs a CUDA GPU with cupy (pip install tensorc[gpu]) and, for the peers, torch;
without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from torch_peer import torch_runner  # beside this script

# --- the graph in PyTorch ----------------------------------------------------------------


# --- timing ------------------------------------------------------------------------------

def median_ms(fn, sync, runs: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def rel_err(got, want) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def bench_model(name, batch, seq, runs, torch):
    import cupy

    import tensorc
    import tensorc.models
    from tensorc.backends.cupy import CupyBackend
    from tensorc.passes import run_pipeline
    overrides = {"max_seq_len": max(seq, 512)} if name == "bert" else {}
    model = tensorc.models.get(name, "small", **overrides)
    feeds = model.example_inputs(batch, None if name == "vit" else seq)
    graph = tensorc.trace(model, **feeds)
    want = tensorc.compile(graph, "numpy")(**feeds)
    row = {"model": name, "batch": batch, "seq": "-" if name == "vit" else seq}

    exe = CupyBackend().compile(run_pipeline(graph, "O2"))
    dev = {k: cupy.asarray(v) for k, v in feeds.items()}
    sync = cupy.cuda.get_current_stream().synchronize
    row["tensorc_ms"] = median_ms(lambda: exe.run_device(dev), sync, runs)
    row["tensorc_err"] = rel_err(exe(**feeds), want)
    if torch is None:
        return row
    peer_graph = run_pipeline(graph, "O1,fuse-attention")
    fn = torch_runner(peer_graph, torch, "cuda")
    args = [torch.as_tensor(feeds[v.name]).cuda() for v in peer_graph.inputs]
    tsync = torch.cuda.synchronize
    with torch.no_grad():
        row["eager_ms"] = median_ms(lambda: fn(*args), tsync, runs)
        row["eager_err"] = rel_err(fn(*args)[0].cpu().numpy(), want)
        try:
            compiled = torch.compile(fn)
            row["compile_ms"] = median_ms(lambda: compiled(*args), tsync, runs)
            row["compile_err"] = rel_err(compiled(*args)[0].cpu().numpy(), want)
        except Exception as e:  # report, keep the other columns
            row["compile_ms"] = f"failed: {str(e).splitlines()[0][:60]}"
    return row


def bench_attention(runs, torch) -> list[dict]:
    """The flash kernel alone against torch SDPA, b=8, h=8, d=64, t=s in (1024, 4096)."""
    return [attention_row(t, causal, runs, torch) for t in (1024, 4096)
            for causal in (False, True)]


def attention_row(t: int, causal: bool, runs: int, torch) -> dict:
    import cupy

    from tensorc.backends.cupy import CupyRuntime
    from tensorc.backends.cupy import kernels as lib
    rt = CupyRuntime()
    b, h, d = 8, 8, 64
    rng = np.random.default_rng(0)
    q, k, v = (cupy.asarray(rng.standard_normal((b, h, t, d), np.float32)) for _ in range(3))
    o = cupy.empty_like(q)
    launch = lib.attention_launch(q, k, v, o, scale=d ** -0.5, causal=causal)
    kern = launch.kernel
    fn = rt.load(kern.source, {kern.name: kern.params})[kern.name]
    flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    sync = cupy.cuda.get_current_stream().synchronize
    ms = median_ms(lambda: rt.launch(fn, kern.params, launch.grid, launch.block, launch.args),
                   sync, runs)
    row = {"t": t, "causal": causal, "tensorc_TFLOPs": flops / ms / 1e9}
    if torch is not None:
        tq, tk, tv = (torch.as_tensor(cupy.asnumpy(x)).cuda() for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tms = median_ms(lambda: sdpa(tq, tk, tv, is_causal=causal), torch.cuda.synchronize,
                        runs)
        row["sdpa_TFLOPs"] = flops / tms / 1e9
        row["max_abs_diff"] = float((torch.as_tensor(cupy.asnumpy(o)).cuda()
                                     - sdpa(tq, tk, tv, is_causal=causal)).abs().max())
    return row


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 else f"{x:.2f}"
    return str(x)


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,bert,vit")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seqs", default="128,1024")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from tensorc.backends.cupy import unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    try:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        torch = None
        print("torch is not installed: only tensorc is timed", file=sys.stderr)
    rows = []
    for name in args.models.split(","):
        seqs = [None] if name == "vit" else [int(s) for s in args.seqs.split(",")]
        for batch in (int(b) for b in args.batches.split(",")):
            for seq in seqs:
                row = bench_model(name, batch, seq or 0, args.runs, torch)
                for peer in ("eager", "compile"):
                    if isinstance(row.get(f"{peer}_ms"), float):
                        row[f"{peer}/tensorc"] = row[f"{peer}_ms"] / row["tensorc_ms"]
                rows.append(row)
                print(row, file=sys.stderr)
    print(table(rows))
    print()
    print(table(bench_attention(args.runs, torch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
