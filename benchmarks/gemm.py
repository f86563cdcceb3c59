"""GEMM and attention speed: tensorc's LLVM kernels vs numpy (OpenBLAS) and ONNX Runtime.

    .venv/bin/python benchmarks/gemm.py [--repeat 30] [--rounds 3] [--threads N]
        [--tune SECONDS]

Prints markdown tables (GFLOP/s, medians). Every peer, tensorc included, runs in its
own subprocess so that its spinning BLAS threads never steal the cores from the next
measurement; the peers take turns for --rounds rounds and each cell keeps its best
round, so that a burst of load from elsewhere on the machine does not decide a cell:

- numpy as configured on this machine (the environment as given, e.g.
  OPENBLAS_CORETYPE=Haswell, which restricts OpenBLAS to AVX2 kernels),
- numpy with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from that subprocess's
  environment only (OpenBLAS then picks its kernel for the real CPU),
- ONNX Runtime's MatMul (MLAS), if onnxruntime is installed.

Which OpenBLAS kernel ran is read with threadpoolctl when it is installed, else from
OpenBLAS's own `*get_corename*` function through ctypes.
tensorc runs twice: with this host's tuned schedules (the per-host cache of `tensorc
tune`; `--tune SECONDS` first tunes this script's GEMM and attention shapes within that
budget) and untuned (TENSORC_TUNE_CACHE=off: the default schedules).
tensorc is measured with B pre-packed (a weight, packed once, the call bound once
with `gemm.bind`, as the LLVM runtime runs it) and with B packed on every call (an
activation, through `gemm.gemm`), on TENSORC_NUM_THREADS threads (default: all cores).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
from engines import cpu_model  # beside this script

# (M, K, N): transformer projections at 128 tokens (d=512: qkv 1536, mlp 2048,
# vocab-ish 8192) and a square one
GEMM_SHAPES = [(128, 512, 2048), (128, 2048, 512), (128, 512, 1536), (128, 512, 8192),
               (1024, 1024, 1024)]
# (batch, heads, seq, head_dim)
ATTN_SHAPES = [(1, 8, 128, 64), (1, 8, 1024, 64)]
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def median_seconds(repeat: int, fn, *args, **kwargs) -> float:
    for _ in range(3):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gflops(m, k, n, seconds):
    return 2 * m * k * n / seconds / 1e9


def operands(m, k, n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)


def attn_operands(b, h, t, d):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((b, h, t, d), np.float32) for _ in range(3)]


def attn_flops(b, h, t, d, causal):
    return 4 * b * h * t * t * d / (2 if causal else 1)


def blas_core() -> str:
    try:
        from threadpoolctl import threadpool_info
        arch = {i.get("architecture") for i in threadpool_info() if i.get("internal_api")
                == "openblas"}
        return "/".join(sorted(a for a in arch if a)) + " (threadpoolctl)"
    except ImportError:
        pass
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("openblas_get_corename", "scipy_openblas_get_corename64_",
                     "openblas_get_corename64_"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode() + f" (threadpoolctl not installed; {name} via ctypes)"
    return "unknown (threadpoolctl not installed, no OpenBLAS corename symbol found)"


def unfused_attention(q, k, v, scale, causal):
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(scale)
    if causal:
        s = np.where(np.tri(s.shape[-2], s.shape[-1], dtype=bool), s, np.float32(-np.inf))
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


# -- workers: each runs in its own process and prints one JSON line ------------------

def worker_numpy(repeat: int) -> dict:
    out = {"core": blas_core(), "gemm": [], "attention": []}
    for m, k, n in GEMM_SHAPES:
        a, b = operands(m, k, n)
        c = np.empty((m, n), np.float32)
        out["gemm"].append(gflops(m, k, n, median_seconds(repeat, np.matmul, a, b, out=c)))
    for shape in ATTN_SHAPES:
        q, k, v = attn_operands(*shape)
        for causal in (False, True):
            sec = median_seconds(max(3, repeat // 5), unfused_attention, q, k, v, 0.125, causal)
            out["attention"].append(sec)
    return out


def worker_ort(repeat: int) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    results = []
    for m, k, n in GEMM_SHAPES:
        a, b = operands(m, k, n)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
            [onnx.numpy_helper.from_array(b, "b")])   # B is a constant weight, as in a model
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("TENSORC_NUM_THREADS", 0))
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        results.append(gflops(m, k, n, median_seconds(repeat, sess.run, None, {"a": a})))
    return {"version": ort.__version__, "gemm": results}


def run_worker(kind: str, repeat: int, env: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--repeat", str(repeat)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[{kind} worker failed: {last}]", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- tensorc ---------------------------------------------------------------------------

def tensorc_calls(repeat: int = 1):
    """(name, call) of every tensorc case this script times (each compiled by a first
    call)."""
    from tensorc.backends.llvm import attention, gemm
    for m, k, n in GEMM_SHAPES:
        a, b = operands(m, k, n)
        c = np.empty((m, n), np.float32)
        # a weight packed once, the call bound once: what the LLVM runtime runs
        yield "packed", gemm.bind(a, gemm.PackedB(b), c)
        yield "per_call", lambda a=a, b=b, c=c: gemm.gemm(a, b, c)
    for shape in ATTN_SHAPES:
        q, k, v = attn_operands(*shape)
        for causal in (False, True):
            yield "attention", lambda q=q, k=k, v=v, causal=causal: attention.attention(
                q, k, v, scale=0.125, causal=causal)


def tune_shapes(budget: float) -> None:
    """Record the kernels this script's cases ask for and tune them (saved per host)."""
    from tensorc.backends.llvm import tuning
    with tuning.record() as seen:
        for _, call in tensorc_calls():
            call()
    for r in tuning.tune(seen, budget):
        print(f"tuned {r.kernel} {r.key}: {r.default_s * 1e3:.3f} -> {r.tuned_s * 1e3:.3f} ms "
              f"{r.chosen}")


def measure_tensorc(repeat: int) -> dict:
    from tensorc.backends.llvm import gemm
    res = {"packed": [], "per_call": [], "attention": []}
    for name, call in tensorc_calls():
        sec = median_seconds(max(5, repeat // 3) if name == "attention" else repeat, call)
        res[name].append(sec if name == "attention" else gflops(*GEMM_SHAPES[len(res[name])],
                                                                 sec))
    return {**res, "threads": gemm.num_threads()}


WORKERS = {"numpy": worker_numpy, "ort": worker_ort, "tensorc": measure_tensorc}


def best(results: list[dict]) -> dict | None:
    """Per cell, the best round: highest GFLOP/s, lowest seconds ('attention')."""
    if not results:
        return None
    out = dict(results[0])
    for key, val in out.items():
        if isinstance(val, list):
            pick = min if key == "attention" else max
            out[key] = [pick(cells) for cells in zip(*(r[key] for r in results), strict=True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per case (median)")
    ap.add_argument("--threads", type=int,
                    help="threads for every peer (TENSORC_NUM_THREADS, OPENBLAS_NUM_THREADS, "
                    "ORT intra-op); default: all cores")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all peers; each cell keeps its best round")
    ap.add_argument("--tune", type=float, metavar="SECONDS",
                    help="first tune tensorc's schedules for these shapes on this host")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--tune-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.repeat)))
        return
    if args.tune_worker:
        tune_shapes(args.tune)
        return
    if args.threads:   # the same thread count for every peer
        os.environ["TENSORC_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = \
            str(args.threads)
    if args.tune:   # in a process of its own, on the threads tensorc will run on
        subprocess.run([sys.executable, __file__, "--tune-worker", "--tune", str(args.tune)],
                       check=True)

    here = dict(os.environ)
    unset = {key: val for key, val in here.items() if key not in UNSET}
    runs = {"np_here": ("numpy", here), "np_unset": ("numpy", unset), "ort": ("ort", here),
            "tc": ("tensorc", here),
            "tc_untuned": ("tensorc", {**here, "TENSORC_TUNE_CACHE": "off"})}
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):   # interleaved, so a burst of load hits one round
        for name, (kind, env) in runs.items():
            res = run_worker(kind, args.repeat, env)
            if res is not None:
                rounds[name].append(res)
    np_here, np_unset, ort_res, tc, untuned = (best(rounds[name]) for name in runs)

    if tc is None:
        sys.exit("the tensorc worker failed")
    env_desc = ", ".join(f"{key}={here[key]}" for key in UNSET if key in here) or "none set"
    pinned = " (every peer)" if args.threads else " (tensorc; the others use their defaults)"
    print(f"{cpu_model()}; threads: {tc['threads']}{pinned}; this machine's OpenBLAS env: "
          f"{env_desc}")
    for label, res in (("numpy (machine env)", np_here), ("numpy (env unset)", np_unset)):
        print(f"{label}: OpenBLAS core {res['core'] if res else 'n/a'}")
    if ort_res:
        print(f"onnxruntime {ort_res['version']}")
    print()
    print(f"GEMM, float32, GFLOP/s: median of {args.repeat} runs, best of {args.rounds} "
          "interleaved rounds; higher is better")
    print()
    print("| M x K x N | tensorc tuned (B packed once) | untuned | tensorc tuned (B packed "
          "per call) | untuned | numpy, machine env | numpy, OPENBLAS_CORETYPE unset | "
          "onnxruntime | tensorc tuned / numpy unset |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (m, k, n) in enumerate(GEMM_SHAPES):
        def cell(res, key="gemm", i=i):
            return f"{res[key][i]:.0f}" if res else "n/a"
        ratio = f"{tc['packed'][i] / np_unset['gemm'][i]:.0%}" if np_unset else "n/a"
        print(f"| {m} x {k} x {n} | {tc['packed'][i]:.0f} | {cell(untuned, 'packed')} | "
              f"{tc['per_call'][i]:.0f} | {cell(untuned, 'per_call')} | "
              f"{cell(np_here)} | {cell(np_unset)} | {cell(ort_res)} | {ratio} |")
    print()
    print("Attention, float32, milliseconds (median, best round; lower is better). "
          "numpy = unfused softmax(q k^T * scale) v, materialising the scores")
    print()
    print("| b x h x seq x d | causal | tensorc flash, tuned | GFLOP/s | untuned | "
          "numpy, machine env | numpy, env unset |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    j = 0
    for b, h, t, d in ATTN_SHAPES:
        for causal in (False, True):
            sec = tc["attention"][j]
            rate = attn_flops(b, h, t, d, causal) / sec / 1e9

            def ms(res, j=j):
                return f"{res['attention'][j] * 1e3:.2f}" if res else "n/a"
            print(f"| {b} x {h} x {t} x {d} | {'yes' if causal else 'no'} | {sec * 1e3:.2f} | "
                  f"{rate:.0f} | {ms(untuned)} | {ms(np_here)} | {ms(np_unset)} |")
            j += 1


if __name__ == "__main__":
    main()
