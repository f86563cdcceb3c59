"""Quantized inference: tensorc fp32, bf16 weights and int8 (dynamic, static) on llvm
against ONNX Runtime fp32, `quantize_dynamic` and `quantize_static`; and the accuracy
int8 keeps on trained checkpoints.

    .venv/bin/python benchmarks/quant.py [--models gpt,bert,vit] [--seq 128] [--rounds 8]
        [--runs 3] [--threads N] [--engines a,b] [--head]
    .venv/bin/python benchmarks/quant.py --accuracy [CHECKPOINT ...]

Latency: small presets, batch 1, the same weights everywhere (ONNX Runtime runs tensorc's
own ONNX export of the traced graph, quantized by onnxruntime.quantization: dynamic with
per-channel s8 weights; static in QDQ format calibrated on the example inputs, as tensorc's
static mode is). Every engine in its own worker process, taking turns (engines.py), all on
`--threads` threads. Sizes: the ONNX files on disk, tensorc's weights in memory (the
constants by dtype). Errors: max |y - y_fp32| / max |y_fp32| against tensorc's fp32 output.
`--head` also quantizes the logits head (tensorc keeps it float by default; ORT's
quantize_dynamic quantizes every MatMul by a weight). The engine "llvm-on-ort-int8-file"
is tensorc's llvm backend running ONNX Runtime's own quantize_dynamic file.

Accuracy: on held-out data of each clm checkpoint (default: tests/data/trained/gpt-tiny),
next-token top-1 agreement of int8 with fp32 and the perplexity of each; on classify
checkpoints (tests/data/trained/vit-tiny) the accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from engines import cpu_model, has, serve, start_engines, take_turns  # beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSORC = {"fp32": "O2", "bf16": "O2,cast-weights:bf16", "int8-dynamic": "O2,quantize",
           "int8-static": "O2,quantize:mode=static"}
ORT = ("ort-fp32", "ort-int8-dynamic", "ort-int8-static")
# tensorc running ONNX Runtime's own quantize_dynamic file (llvm, O2)
TENSORC_ON_ORT = "llvm-on-ort-int8-file"


def build(name: str, seq: int):
    import tensorc
    import tensorc.models
    model = tensorc.models.get(name, "small")
    feeds = model.example_inputs(batch=1, seq=None if name == "vit" else seq)
    return feeds, tensorc.trace(model, **feeds)


def tensorc_graph(engine: str, g, feeds, head: bool):
    from tensorc.passes import run_pipeline
    spec = TENSORC[engine] + (":head=1" if head and "quantize" in TENSORC[engine] else "")
    return run_pipeline(g, spec, options={"quantize": {"data": [feeds]}})


def ort_model(engine: str, g, feeds, folder: str) -> str:
    """The ONNX file ONNX Runtime runs for `engine` (tensorc's export, quantized)."""
    from tensorc.frontend.onnx import save
    fp32 = os.path.join(folder, "fp32.onnx")
    if not os.path.exists(fp32):
        save(g, fp32)
    if engine == "ort-fp32":
        return fp32
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    out = os.path.join(folder, engine + ".onnx")
    if engine == "ort-int8-dynamic":
        quantize_dynamic(fp32, out, per_channel=True, weight_type=QuantType.QInt8)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([feeds])

        def get_next(self):
            return next(self.items, None)
    # MatMul and Gemm only (as tensorc's pass): left to quantize every op the tool gives
    # the masked attention scores (range -inf) NaN scales
    quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["MatMul", "Gemm"])
    return out


def engine_fn(engine: str, name: str, seq: int, head: bool, folder: str):
    feeds, g = build(name, seq)
    if engine == TENSORC_ON_ORT:
        from tensorc.backends import get_backend
        from tensorc.frontend.onnx import load
        from tensorc.passes import run_pipeline
        path = ort_model("ort-int8-dynamic", g, feeds, folder)
        exe = get_backend("llvm").compile(run_pipeline(load(path), "O2"))
        return lambda: exe.run(feeds)
    if engine in TENSORC:
        from tensorc.backends import get_backend
        exe = get_backend("llvm").compile(tensorc_graph(engine, g, feeds, head))
        return lambda: exe.run(feeds)
    if not has("onnxruntime"):
        return "onnxruntime not installed"
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ["TENSORC_NUM_THREADS"])
    sess = ort.InferenceSession(ort_model(engine, g, feeds, folder), opts,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ort_feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    return lambda: dict(zip(names, sess.run(None, ort_feeds), strict=True))


def worker(engine: str, name: str, seq: int, head: bool, folder: str) -> None:
    """Subprocess entry: build one engine, save its output beside the others, time runs."""
    fn = engine_fn(engine, name, seq, head, folder)
    if isinstance(fn, str):
        print(json.dumps(fn), flush=True)
        return
    out = fn()
    np.save(os.path.join(folder, engine + ".out.npy"), next(iter(out.values())))
    serve(fn)


def bench(name: str, seq: int, engines, rounds: int, runs: int, head: bool) -> dict:
    folder = tempfile.mkdtemp(prefix=f"quant-{name}-")

    def start(engine):
        return subprocess.Popen([sys.executable, __file__, "--worker", engine, name,
                                 "--seq", str(seq), "--folder", folder]
                                + ["--head"] * head, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs, failed = start_engines({e: lambda e=e: start(e) for e in engines})
    times = take_turns(procs, rounds, lambda key: f"run {runs} 2")
    row = {"model": name, "failed": failed}
    fp32_out = np.load(os.path.join(folder, "fp32.out.npy")) if "fp32" in procs else None
    for e, answers in times.items():
        row[e] = {"ms": 1000 * float(np.median(sum(answers, [])))}
        out = np.load(os.path.join(folder, e + ".out.npy"))
        if fp32_out is not None:
            row[e]["rel_err"] = float(np.abs(out - fp32_out).max() / np.abs(fp32_out).max())
        path = os.path.join(folder, ("ort-int8-dynamic" if e == TENSORC_ON_ORT else e) + ".onnx")
        if e in ORT or e == TENSORC_ON_ORT:
            row[e]["file_mb"] = os.path.getsize(path if os.path.exists(path)
                                                else os.path.join(folder, "fp32.onnx")) / 1e6
    feeds, g = build(name, seq)
    for e in engines:
        if e in TENSORC and e in row:
            sizes = tensorc_graph(e, g, feeds, head).weight_bytes()
            row[e]["weights_mb"] = sum(sizes.values()) / 1e6
            row[e]["by_dtype"] = {k: round(v / 1e6, 2) for k, v in sizes.items()}
    return row


def table(rows, engines) -> str:
    lines = ["| model | engine | ms | vs ORT int8 dynamic | vs own fp32 | rel err vs fp32 "
             "| weights MB (tensorc: in memory by dtype; ORT: file) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ort_q = r.get("ort-int8-dynamic", {}).get("ms")
        for e in engines:
            if e not in r:
                lines.append(f"| {r['model']} | {e} | failed: {r['failed'].get(e, '?')} |"
                             " | | | |")
                continue
            x = r[e]
            own = r.get("fp32" if e in TENSORC else "ort-fp32", {}).get("ms")
            size = f"{x['weights_mb']:.1f} ({x['by_dtype']})" if "weights_mb" in x \
                else f"{x.get('file_mb', 0):.1f} (file)"
            vs_ort = f"{x['ms'] / ort_q:.2f}x" if ort_q else "-"
            vs_own = f"{own / x['ms']:.2f}x faster" if own else "-"
            lines.append(f"| {r['model']} | {e} | {x['ms']:.2f} | {vs_ort} | {vs_own} | "
                         f"{x.get('rel_err', float('nan')):.2g} | {size} |")
    return "\n".join(lines)


# --- accuracy on trained checkpoints ---------------------------------------------------

VARIANTS = {"fp32": "O2", "int8 dynamic": "O2,quantize",
            "int8 dynamic, 1 most sensitive matmul float": "O2,quantize:sensitive=1",
            "int8 dynamic, 2 most sensitive float": "O2,quantize:sensitive=2",
            "int8 dynamic, head and embedding too": "O2,quantize:head=1",
            "int8 static (minmax)": "O2,quantize:mode=static"}

def accuracy(paths: list[str], batches: int = 16, variants: dict | None = None) -> list[dict]:
    """Per checkpoint, each of `variants` (label -> pipeline; the first is the
    reference): classify accuracy, or perplexity, with top-1 agreement with the first."""
    import tensorc
    from tensorc.data import IGNORE_INDEX, clm_eval_batches, text_corpus
    from tensorc.passes import run_pipeline
    from tensorc.training import TaskData, load_checkpoint_model
    rows = []
    for path in paths:
        model = load_checkpoint_model(path)
        meta = json.load(open(os.path.join(path, "trainer.json")))
        task = meta["extra"]["task"]
        row = {"checkpoint": os.path.relpath(path, ROOT), "task": task}
        if task == "classify":   # calibration on training images, measured on held-out ones
            digits = TaskData("classify", 8, 1, None)
            images, labels = digits.val
            g = tensorc.trace(model, pixel_values=images)
            calib = {"pixel_values": digits.train[0][:len(images)]}
        else:                    # calibration on a training batch, measured on held-out text
            corpus = text_corpus(None)
            seq = model.config.max_seq_len
            data = list(clm_eval_batches(corpus.val, 8, seq))[:batches]
            g = tensorc.trace(model, input_ids=data[0]["input_ids"])
            calib = next(clm_eval_batches(corpus.train[:100_000], 8, seq))
            calib = {"input_ids": calib["input_ids"]}
        outs = {}
        variants = variants or VARIANTS
        first = next(iter(variants))
        for label, spec in variants.items():
            exe = tensorc.compile(run_pipeline(g, spec, options={"quantize": {"data": [calib]}}),
                                  "llvm")
            if task == "classify":
                outs[label] = exe(pixel_values=images)
            else:
                outs[label] = [exe(input_ids=b["input_ids"]) for b in data]
        if task == "classify":
            for label, logits in outs.items():
                row[label] = {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
                              "top1_agreement": float(np.mean(
                                  logits.argmax(-1) == outs[first].argmax(-1)))}
        else:
            labels = [b["labels"] for b in data]
            for label, logits in outs.items():
                nll, agree, count = 0.0, 0, 0
                for lg, ref, lab in zip(logits, outs[first], labels, strict=True):
                    keep = lab != IGNORE_INDEX
                    logp = lg - lg.max(-1, keepdims=True)
                    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
                    nll -= np.take_along_axis(logp, np.where(keep, lab, 0)[..., None],
                                              -1)[..., 0][keep].sum()
                    agree += int((lg.argmax(-1) == ref.argmax(-1))[keep].sum())
                    count += int(keep.sum())
                row[label] = {"perplexity": float(np.exp(nll / count)),
                              "top1_agreement": agree / count, "tokens": count}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--folder")
    ap.add_argument("models_or_checkpoints", nargs="*")
    ap.add_argument("--models", default="gpt,bert,vit")
    ap.add_argument("--engines", default=",".join(list(TENSORC) + list(ORT) + [TENSORC_ON_ORT]))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--accuracy", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.models_or_checkpoints[0], args.seq, args.head, args.folder)
        return
    print(f"CPU: {cpu_model()}; threads: {args.threads}")
    if args.accuracy:
        paths = args.models_or_checkpoints or [os.path.join(ROOT, "tests/data/trained", d)
                                               for d in ("gpt-tiny", "vit-tiny")]
        print(json.dumps(accuracy(paths), indent=1))
        return
    for var in ("TENSORC_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    engines = args.engines.split(",")
    rows = [bench(m, args.seq, engines, args.rounds, args.runs, args.head)
            for m in args.models.split(",")]
    print(json.dumps(rows, indent=1))
    print(table(rows, engines))


if __name__ == "__main__":
    main()
