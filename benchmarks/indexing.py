"""TopK and Resize, imported from one-node ONNX models, on tensorc's llvm and numpy
backends against ONNX Runtime, float32.

    .venv/bin/python benchmarks/indexing.py [--threads 2] [--repeat 20] [--rounds 3]

Cases: topk over logits-shaped rows (8 x 32000, k 5 and 50: top-k sampling) and 64 x
1000 (k 10); Resize of a [1, 3, 224, 224] image by 2 (nearest, linear) and by 0.5
(cubic with antialias). One process, engines taking turns for --rounds rounds; a cell is
the median of --repeat calls and keeps its best round (the machine may be shared).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _topk(shape, k):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    g = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"])], "m", [x], outs,
                          [numpy_helper.from_array(np.array([k], np.int64), "k")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), shape


def _resize(shape, scale, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    consts = [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
              numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "s")]
    g = helper.make_graph([helper.make_node("Resize", ["x", "roi", "s"], ["y"], **attrs)], "m",
                          [x], [y], consts)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), shape


CASES = {
    "topk 8x32000 k5": _topk([8, 32000], 5),
    "topk 8x32000 k50": _topk([8, 32000], 50),
    "topk 64x1000 k10": _topk([64, 1000], 10),
    "resize nearest x2": _resize([1, 3, 224, 224], 2.0, mode="nearest"),
    "resize linear x2": _resize([1, 3, 224, 224], 2.0, mode="linear"),
    "resize cubic aa x0.5": _resize([1, 3, 224, 224], 0.5, mode="cubic", antialias=1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["TENSORC_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort

    from tensorc.backends import get_backend
    from tensorc.frontend import onnx as tx

    print(f"threads {args.threads}; onnxruntime {ort.__version__}; ms, median of "
          f"{args.repeat}, best of {args.rounds} rounds")
    print(f"{'case':24} {'llvm':>9} {'numpy':>9} {'ORT':>9}")
    for name, (model, shape) in CASES.items():
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        graph = tx.from_model(model)
        runs = {"llvm": get_backend("llvm").compile(graph),
                "numpy": get_backend("numpy").compile(graph)}
        feeds = {"x": x}
        calls = {k: functools.partial(e.run, feeds) for k, e in runs.items()}
        calls["ORT"] = functools.partial(sess.run, None, feeds)
        best = {}
        for _ in range(args.rounds):
            for k, f in calls.items():
                f()
                ts = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t)
                best[k] = min(best.get(k, np.inf), float(np.median(ts)) * 1e3)
        print(f"{name:24} {best['llvm']:9.3f} {best['numpy']:9.3f} {best['ORT']:9.3f}")


if __name__ == "__main__":
    main()
