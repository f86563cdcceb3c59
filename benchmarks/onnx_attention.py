"""ONNX's opset-23 Attention node imported onto tensorc's `attention` op (llvm's flash
kernel) against the same node's ONNX function body (what `_expanded` models hold:
matmul, softmax and the mask arithmetic) and against ONNX Runtime's Attention kernel.
Causal, float32, b1 h8 d64, one thread each.

    .venv/bin/python benchmarks/onnx_attention.py [--seqs 256,1024] [--runs 7]

A cell is the median of --runs calls after two untimed ones; `err` is the max
|tensorc - ORT| / max |ORT|.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.backend.test.case.node import function_testcase_helper

from tensorc.backends import get_backend
from tensorc.frontend import onnx as tx
from tensorc.passes import run_pipeline


def models(t: int, b: int = 1, h: int = 8, d: int = 64):
    """The one-node Attention model and its expanded function body."""
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1)
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, h, t, d]) for n in "QKV"]
    out = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    opset = [helper.make_opsetid("", 23)]
    one = helper.make_model(helper.make_graph([node], "m", ins, out), opset_imports=opset)
    # (the helper edits the node it is given: expand a copy)
    body = function_testcase_helper(copy.deepcopy(node), [i.type for i in ins], "bench",
                                    opset)[0][0][0]
    return one, helper.make_model(helper.make_graph(body, "m", ins, out), opset_imports=opset)


def median_ms(f, runs: int) -> float:
    f(), f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="256,1024")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    os.environ["TENSORC_NUM_THREADS"] = "1"
    print("| seq | engine | attention ops | ms | err |\n| --- | --- | --- | --- | --- |")
    for t in map(int, args.seqs.split(",")):
        node, body = models(t)
        rng = np.random.default_rng(0)
        feeds = {n: (0.5 * rng.standard_normal((1, 8, t, 64))).astype(np.float32)
                 for n in "QKV"}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(node.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)[0]
        print(f"| {t} | ONNX Runtime Attention | - | "
              f"{median_ms(lambda s=sess, f=feeds: s.run(None, f), args.runs):.1f} | - |")
        for name, model, passes in [("tensorc, Attention node", node, "O0"),
                                    ("tensorc, expanded body", body, "O0"),
                                    ("tensorc, expanded body, O2", body, "O2")]:
            graph = run_pipeline(tx.from_model(model), passes)
            exe = get_backend("llvm").compile(graph)
            err = np.abs(exe(**feeds) - want).max() / np.abs(want).max()
            fused = sum(n.op == "attention" for n in graph.nodes)
            ms = median_ms(lambda e=exe, f=feeds: e(**f), args.runs)
            print(f"| {t} | {name} | {fused} | {ms:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
