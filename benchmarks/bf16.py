"""bf16 weights (issue 13): GPT small on the LLVM backend, float32 weights vs
`cast-weights:bf16`, latency and logit error.

    .venv/bin/python benchmarks/bf16.py [--shapes 1x128,1x1] [--runs 30] [--rounds 5]
        [--threads 2] [--model gpt] [--preset small]
    .venv/bin/python benchmarks/bf16.py --dot

`--dot` instead measures one core's throughput of AVX512_BF16's `vdpbf16ps` against
float32 `vfmadd` (16 independent accumulator chains each, LLVM IR JIT-compiled for
the host): the reason the GEMM widens bf16 weights to float32 rather than using the
bf16 dot product (which would also round A to bf16).

Both variants are compiled in this process (O2, and O2,cast-weights:bf16) from the
same traced graph, warmed up, then take turns: each round times --runs calls of one,
then of the other; a cell is the median over all its calls (>= runs x rounds). The
error is the bf16 variant's logits against the f32 variant's (same backend, same
inputs): the largest absolute difference, that over the largest |logit|, and the share
of positions whose most likely token is the same.
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
    ap.add_argument("--dot", action="store_true", help="vdpbf16ps vs vfmadd throughput")
    args = ap.parse_args()
    if args.dot:
        dot_throughput()
        return
    os.environ["TENSORC_NUM_THREADS"] = str(args.threads)

    import numpy as np

    import tensorc
    import tensorc.models
    from tensorc.passes import run_pipeline

    model = tensorc.models.get(args.model, args.preset)
    print(f"{args.model} {args.preset}, llvm, {args.threads} threads; "
          f"median of {args.runs} x {args.rounds} calls after warm-up")
    print("| shape | weights | stored MiB | packed MiB | latency ms | vs f32 "
          "| max abs logit err | rel (/ max abs logit) | same argmax |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
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
            same = (outs[k].argmax(-1) == ref.argmax(-1)).mean()
            print(f"| b{batch} s{seq} | {k} | {stored:.1f} | {packed:.1f} | {ms * 1e3:.2f} "
                  f"| {ms / base:.2f}x | {d:.3g} | {d / np.abs(ref).max():.2e} "
                  f"| {same:.1%} |")


def dot_throughput(chains: int = 16, iters: int = 2_000_000, repeat: int = 9) -> None:
    """GFLOP/s of one core: `chains` independent 16-lane accumulators, each updated by
    an FMA (2 flops a lane) or a vdpbf16ps (two bf16 products and their sum: 4 flops
    a lane) per iteration."""
    import ctypes

    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    feats = llvm.get_host_cpu_features()
    print(f"host: {llvm.get_host_cpu_name()}, avx512bf16: {feats.get('avx512bf16', False)}")
    if not feats.get("avx512bf16", False):
        print("no AVX512_BF16 here: nothing to compare")
        return
    fma = ("call <16 x float> @llvm.fma.v16f32(<16 x float> %x, <16 x float> %y, "
           "<16 x float> %a{i})",
           "declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)", 2)
    dp = ("call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %a{i}, "
          "<32 x bfloat> %xb, <32 x bfloat> %yb)",
          "declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, "
          "<32 x bfloat>, <32 x bfloat>)", 4)
    for name, (op, decl, flops) in (("vfmadd (f32)", fma), ("vdpbf16ps (bf16)", dp)):
        phis = "".join(f"  %a{i} = phi <16 x float> [zeroinitializer, %entry], "
                       f"[%n{i}, %loop]\n" for i in range(chains))
        ops = "".join(f"  %n{i} = {op.format(i=i)}\n" for i in range(chains))
        sums = "".join(f"  %s{i} = fadd <16 x float> %s{i - 1}, %a{i}\n"
                       for i in range(1, chains))
        text = f"""{decl}
define float @run(i64 %n, float %v) {{
entry:
  %x0 = insertelement <16 x float> undef, float %v, i32 0
  %x = shufflevector <16 x float> %x0, <16 x float> undef, <16 x i32> zeroinitializer
  %y = fadd <16 x float> %x, %x
  %xb = bitcast <16 x float> %x to <32 x bfloat>
  %yb = bitcast <16 x float> %y to <32 x bfloat>
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%i1, %loop]
{phis}{ops}  %i1 = add i64 %i, 1
  %c = icmp slt i64 %i1, %n
  br i1 %c, label %loop, label %exit
exit:
  %s0 = fadd <16 x float> %a0, zeroinitializer
{sums}  %r = extractelement <16 x float> %s{chains - 1}, i32 0
  ret float %r
}}
"""
        tm = llvm.Target.from_default_triple().create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=feats.flatten(), opt=3)
        mod = llvm.parse_assembly(text)
        engine = llvm.create_mcjit_compiler(mod, tm)   # owns tm
        engine.finalize_object()
        fn = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_int64, ctypes.c_float)(
            engine.get_function_address("run"))
        fn(1000, 1.0)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(iters, 1.0)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{name}: {iters * chains / t / 1e9:.2f} G instructions/s, "
              f"{iters * chains * 16 * flops / t / 1e9:.0f} GFLOP/s")


def _llvm(graph):
    from tensorc.backends import get_backend
    return get_backend("llvm").compile(graph)


def _packed_bytes(exe) -> int:
    """Bytes of the PackedB panels of the executable's bound runners."""
    return sum(p.data.nbytes for r in exe._runners.values() for p in r._packed.values())


if __name__ == "__main__":
    main()
