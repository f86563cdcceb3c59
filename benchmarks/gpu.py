"""GPU latency: tensorc cupy vs PyTorch eager and torch.compile, same weights.

    python benchmarks/gpu.py [--models gpt,bert,vit] [--shapes 1x128,8x512]
                             [--precisions fp32,tf32,fp16] [--compile-models gpt] [--runs 30]

Small presets. Every peer runs the same traced tensorc graph with the same weights:
tensorc through its cupy backend (O2: fused regions, cuBLAS GEMMs with fused
epilogues, the flash-attention kernel, CUDA-graph replay); PyTorch through a small
interpreter of the graph (`torch_runner`) whose ops are torch calls, attention
being `scaled_dot_product_attention`; torch.compile compiles that interpreter
(dynamo unrolls the node loop into one FX graph). Inputs and outputs stay on the
device for every peer; each median is over `--runs` calls, synchronised.

Precisions, the same for both engines: fp32 (TF32 off everywhere), tf32 (TF32
tensor-core matmuls), fp16 (matmuls on fp16-rounded operands, the rest in fp32:
tensorc's `precision="fp16"`, PyTorch's autocast, whose SDPA then also runs in
fp16). Each peer's error against the numpy reference is printed beside its time.

Then the attention kernel alone: tensorc's flash kernel vs torch SDPA, fp32, TFLOP/s.

It needs a CUDA GPU with cupy (pip install tensorc[gpu]) and, for the peers, torch;
without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _torch_precision(torch, precision: str):
    """PyTorch set to do what tensorc's `precision` does: fp32 with TF32 off, TF32
    tensor-core matmuls, or fp16 matmuls with fp32 elsewhere (autocast)."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def bench_model(name, batch, seq, precision, runs, torch, compile_peer: bool):
    import cupy

    import tensorc
    import tensorc.models
    from tensorc.backends.cupy import CupyBackend
    from tensorc.passes import run_pipeline
    overrides = {"max_seq_len": max(seq, 512)} if name == "bert" else {}
    model = tensorc.models.get(name, "small", **overrides)
    feeds = model.example_inputs(batch, None if name == "vit" else seq)
    graph = tensorc.trace(model, **feeds)
    want = _reference(graph, feeds)
    row = {"model": name, "batch": batch, "seq": "-" if name == "vit" else seq,
           "precision": precision}

    exe = CupyBackend(precision=precision).compile(run_pipeline(graph, "O2"))
    dev = {k: cupy.asarray(v) for k, v in feeds.items()}
    sync = cupy.cuda.get_current_stream().synchronize
    row["tensorc_ms"] = median_ms(lambda: exe.run_device(dev), sync, runs)
    row["tensorc_err"] = rel_err(exe(**feeds), want)
    notes = [p.capture_note for p in exe._prepared.values() if p.capture_note]
    row["cuda_graph"] = "yes" if exe.stats["graph_replays"] else f"no ({'; '.join(notes)})"
    if torch is None:
        return row
    peer_graph = run_pipeline(graph, "O1,fuse-attention")
    fn = torch_runner(peer_graph, torch, "cuda")
    args = [torch.as_tensor(feeds[v.name]).cuda() for v in peer_graph.inputs]
    tsync = torch.cuda.synchronize
    with torch.no_grad(), _torch_precision(torch, precision):
        row["eager_ms"] = median_ms(lambda: fn(*args), tsync, runs)
        row["eager_err"] = rel_err(fn(*args)[0].float().cpu().numpy(), want)
        if compile_peer:
            try:
                compiled = torch.compile(fn)
                row["compile_ms"] = median_ms(lambda: compiled(*args), tsync, runs)
                row["compile_err"] = rel_err(compiled(*args)[0].float().cpu().numpy(), want)
            except Exception as e:  # report, keep the other columns
                row["compile_ms"] = f"failed: {str(e).splitlines()[0][:60]}"
    return row


_REFERENCES: dict = {}


def _reference(graph, feeds):
    """The numpy reference's output, computed once per (model, shape)."""
    import tensorc
    key = (graph.name, tuple((k, v.shape) for k, v in feeds.items()))
    if key not in _REFERENCES:
        _REFERENCES[key] = tensorc.compile(graph, "numpy")(**feeds)
    return _REFERENCES[key]


def profile_steps(name: str, batch: int, seq: int, precision: str, runs: int) -> str:
    """Where one eager call's GPU time goes: every Program step timed with CUDA events,
    summed by kind (generated kernel, cuBLAS matmul + epilogue, attention, host)."""
    import cupy

    import tensorc
    import tensorc.models
    from tensorc.backends import lowering as L
    from tensorc.backends.cupy import CupyBackend
    from tensorc.passes import run_pipeline
    model = tensorc.models.get(name, "small")
    feeds = model.example_inputs(batch, None if name == "vit" else seq)
    exe = CupyBackend(precision=precision, cuda_graph=False).compile(
        run_pipeline(tensorc.trace(model, **feeds), "O2"))
    exe(**feeds)
    prep = next(iter(exe._prepared.values()))
    totals: dict[str, list[float]] = {}
    for _ in range(runs):
        exe._copy_in(prep, [feeds[n] for n in exe.input_names])  # the arena reuses them
        for fn, step in zip(prep.steps, prep.program.steps, strict=True):
            kind = ("kernel" if isinstance(step, L.KernelStep) else
                    "index check" if isinstance(step, L.IndexCheck) else
                    "host " + step.op if step.fallback else step.op)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            totals.setdefault(kind, []).append(cupy.cuda.get_elapsed_time(start, end))
    lines = [f"profile {name} b{batch} s{seq} {precision}: {len(prep.steps)} steps, "
             "GPU ms per call by kind (eager, CUDA events)"]
    for kind, ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {kind:12s} {sum(ts) / runs:8.3f} ms  ({len(ts) // runs} steps)")
    return "\n".join(lines)


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
        torch.backends.cuda.matmul.allow_tf32 = False
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


def device_banner(torch) -> str:
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    drv = rt.driverGetVersion()
    line = (f"device: {name}, {props['multiProcessorCount']} SMs; CUDA driver API "
            f"{drv // 1000}.{drv % 1000 // 10}; cupy {cupy.__version__}")
    if torch is not None:
        line += f"; torch {torch.__version__}"
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,bert,vit")
    ap.add_argument("--shapes", default="1x128,8x512",
                    help="batch x seq pairs (vit takes the batch only)")
    ap.add_argument("--precisions", default="fp32,tf32,fp16")
    ap.add_argument("--compile-models", default="gpt",
                    help="models also timed under torch.compile (fp32 rows; slow to compile)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-attention", action="store_true", help="skip the kernel table")
    ap.add_argument("--profile", action="store_true",
                    help="first print where the first model's GPU time goes, per step kind")
    args = ap.parse_args()
    from tensorc.backends.cupy import unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: only tensorc is timed", file=sys.stderr)
    print(device_banner(torch), flush=True)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    if args.profile:
        for b, t in shapes:
            for precision in args.precisions.split(","):
                print(profile_steps(args.models.split(",")[0], b, t, precision, 5), flush=True)
    compile_models = set(args.compile_models.split(",")) if args.compile_models else set()
    rows = []
    for name in args.models.split(","):
        for batch, seq in dict.fromkeys((b, 0 if name == "vit" else s) for b, s in shapes):
            for precision in args.precisions.split(","):
                row = bench_model(name, batch, seq, precision, args.runs, torch,
                                  name in compile_models and precision == "fp32")
                for peer in ("eager", "compile"):
                    if isinstance(row.get(f"{peer}_ms"), float):
                        row[f"tensorc/{peer}"] = row["tensorc_ms"] / row[f"{peer}_ms"]
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print(table(rows), flush=True)
    if not args.no_attention:
        print()
        print(table(bench_attention(args.runs, torch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
