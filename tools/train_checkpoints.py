"""Train the zoo's small checkpoints on the bundled data, the ones later work measures
against (quantization's and pruning's accuracy): one command, a few minutes per model
on 2 cores, each checkpoint a directory `tensorc run/generate/export` accept.

    python tools/train_checkpoints.py --out checkpoints [--only gpt,vit] [--scale 0.2] [--qat]

Prints a markdown table of what each reached on held-out data (bits per byte, masked
-byte loss, digits accuracy, BLEU) and the time it took. `--scale` shortens every run
(for a quick check of the script itself); `--qat` trains quantization-aware (the
checkpoints then run in int8 with `--passes O2,quantize`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tensorc.training import Run, TrainConfig, fit  # noqa: E402

# name: (run settings, step settings). Sizes chosen to learn something real in minutes.
RECIPES = {
    "gpt": (dict(model="gpt", overrides={"d_model": 128, "n_layer": 4, "n_head": 4,
                                         "d_ff": 512, "max_seq_len": 128},
                 task="clm", batch=16, seq=128, data_bytes=4_000_000),
            dict(steps=1500, lr=2e-3, warmup=100)),
    "bert": (dict(model="bert", overrides={"d_model": 128, "n_layer": 4, "n_head": 4,
                                           "d_ff": 512, "max_seq_len": 128},
                  task="mlm", batch=16, seq=128, data_bytes=4_000_000),
             dict(steps=1500, lr=1e-3, warmup=100)),
    "vit": (dict(model="vit", overrides={"d_model": 64, "n_layer": 4, "n_head": 4,
                                         "d_ff": 128}, task="classify", batch=64),
            dict(steps=1000, lr=2e-3, warmup=50)),
    "transformer": (dict(model="transformer", overrides={"d_model": 64, "d_ff": 128},
                         task="translate", batch=32),
                    dict(steps=600, lr=2e-3, warmup=50)),
}
METRICS = ("bits_per_byte", "val_loss", "val_accuracy", "bleu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints", help="directory of the checkpoints")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(RECIPES))
    ap.add_argument("--backend", default="llvm")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the steps to run")
    ap.add_argument("--qat", action="store_true", help="quantization-aware training")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RECIPES)
    rows = []
    for name in names:
        run_kw, cfg_kw = RECIPES[name]
        cfg_kw = {**cfg_kw, **{k: max(1, int(cfg_kw[k] * args.scale))
                               for k in ("steps", "warmup")}}
        run = Run(**run_kw, backend=args.backend, out=os.path.join(args.out, name))
        t0 = time.perf_counter()
        last = fit(run, TrainConfig(**cfg_kw, qat=args.qat))
        seconds = time.perf_counter() - t0
        got = {k: round(last[k], 4) for k in METRICS if k in last}
        rows.append((name, run.task, cfg_kw["steps"], got, seconds, last["step_ms"]))
        print(json.dumps({"model": name, **got, "seconds": round(seconds, 1)}), flush=True)
    print("\n| model | task | steps | held-out result | wall time | last step |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for name, task, steps, got, seconds, ms in rows:
        shown = ", ".join(f"{k} {v}" for k, v in got.items())
        print(f"| {name} | {task} | {steps} | {shown} | {seconds:.0f} s | {ms:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
