"""Structured pruning (issue 15): parameters, FLOPs, latency and held-out quality of a
trained model with 0/10/30/50 % of its heads and FFN neurons removed, before and after
recovery (distillation from the unpruned model).

    .venv/bin/python benchmarks/prune.py CHECKPOINT [--ratios 0,0.1,0.3,0.5] [--by taylor]
        [--steps 200] [--seq 128] [--rounds 5] [--runs 5] [--threads 2]
        [--plot benchmarks/prune.png]

CHECKPOINT is a `tensorc train` checkpoint (tools/train_checkpoints.py's GPT: d128 x 4,
seq 128, byte-level). Each ratio removes that share of the heads and of the FFN neurons
(`prune:heads=R:ffn=R:by=...`, importance on 4 batches of the training text); recovery
distils for --steps from the unpruned model's logits (lr 5e-4, batch 16,
`tensorc.pruning.recover`), and at 0 % the unpruned model gets the same steps: the
control (the checkpoint's own schedule had ended). Quality: held-out bits per byte
(perplexity = 2^bpb) on the stdlib validation text, 4 MB of data as the checkpoint was
trained with. Latency: batch 1 x --seq on the llvm backend (O2) and in ONNX Runtime on
the same exported graph, each engine in its own worker process, taking turns
(benchmarks/engines.py), --threads each.
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


def worker(engine: str, path: str, seq: int, threads: int) -> None:
    """Serve one engine running the ONNX file `path` on one batch of --seq token ids."""
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, seq), np.int64)}
    if engine == "llvm":
        import tensorc
        from tensorc.frontend import onnx as tx
        graph = tx.load(path)
        exe = tensorc.compile(graph, "llvm", "O2")
        run = lambda: exe.run({v.name: feeds[v.name] for v in graph.inputs})  # noqa: E731
    else:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        run = lambda: sess.run(None, feeds)  # noqa: E731
    run()
    serve(run)


def latency(path: str, seq: int, rounds: int, runs: int, threads: int) -> dict[str, float]:
    engines = ["llvm"] + (["ort"] if has("onnxruntime") else [])
    env = {**os.environ, "TENSORC_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}

    def start(engine):
        return subprocess.Popen([sys.executable, __file__, "--worker", engine, path,
                                 "--seq", str(seq), "--threads", str(threads)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    procs, failed = start_engines({e: lambda e=e: start(e) for e in engines})
    times = take_turns(procs, rounds, lambda key: f"run {runs} 2")
    out = {e: 1e3 * float(np.median([t for r in ts for t in r])) for e, ts in times.items()}
    return {**out, **{e: float("nan") for e in failed}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--ratios", default="0,0.1,0.3,0.5")
    ap.add_argument("--by", default="taylor", choices=("magnitude", "activation", "taylor"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default="benchmarks/prune.png")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "ONNX"))
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker, a.seq, a.threads)
        return
    os.environ["TENSORC_NUM_THREADS"] = str(a.threads)
    from tensorc import pruning
    from tensorc.frontend import onnx as tx
    from tensorc.passes import run_pipeline
    src = pruning.load(a.checkpoint)
    kw = {"seq": a.seq, "data_bytes": 4_000_000}
    calib = pruning.calibration(src.task, **kw) if a.by != "magnitude" else None
    print(f"CPU: {cpu_model()}; {a.threads} threads; {src.name} ({src.task}); importance "
          f"{a.by}; recovery: {a.steps} distillation steps\n")
    print("| heads & FFN removed | params | GFLOPs (b1) | llvm ms | ORT ms | bpb pruned | "
          "bpb recovered | ppl pruned | ppl recovered |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    tmp = tempfile.mkdtemp()
    for r in (float(x) for x in a.ratios.split(",")):
        g = run_pipeline(src.graph, f"prune:heads={r}:ffn={r}:by={a.by}",
                         options={"prune": {"data": calib}})
        size = pruning.size(g, 1, a.seq)
        before = pruning.evaluate(g, src.task, **kw)["bits_per_byte"]
        after = float("nan")
        if a.steps:   # at 0 %: the same training unpruned, the control
            g, record = pruning.recover(g, src.graph, src.task, a.steps, **kw)
            after = record["bits_per_byte"]
        path = os.path.join(tmp, f"pruned{r}.onnx")
        tx.save(g, path)
        ms = latency(path, a.seq, a.rounds, a.runs, a.threads)
        row = {"ratio": r, **size, **ms, "bpb": before, "bpb_recovered": after}
        rows.append(row)
        print(f"| {r:.0%} | {size['params']:,} | {size['flops'] / 1e9:.3f} | "
              f"{ms['llvm']:.2f} | {ms.get('ort', float('nan')):.2f} | {before:.3f} | "
              f"{after:.3f} | {2 ** before:.2f} | {2 ** after:.2f} |", flush=True)
    print(json.dumps(rows))
    if a.plot and has("matplotlib"):
        plot(rows, a)


def plot(rows, a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ratios = [100 * r["ratio"] for r in rows]
    left.plot(ratios, [r["bpb"] for r in rows], marker="o", label="pruned")
    left.plot(ratios, [r["bpb_recovered"] for r in rows], marker="o",
              label=f"+ {a.steps} distillation steps")
    left.set_xlabel("heads and FFN neurons removed (%)")
    left.set_ylabel("held-out bits per byte")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(ratios, [r["llvm"] for r in rows], marker="o", label="tensorc llvm")
    if "ort" in rows[0]:
        right.plot(ratios, [r["ort"] for r in rows], marker="o", label="ONNX Runtime")
    right.set_xlabel("heads and FFN neurons removed (%)")
    right.set_ylabel(f"ms per call (b1 s{a.seq})")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=90)
    print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
