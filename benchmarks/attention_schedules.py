"""The flash-attention kernel's schedules (backends/llvm/attention_schedule.py) on this
host: every candidate of a few model shapes' keys, timed as the tuner times them
(median seconds of --repeat bound calls on the Space's random operands), taking turns
for --rounds rounds; a cell is the median of the rounds' medians, in milliseconds.

    .venv/bin/python benchmarks/attention_schedules.py [--rounds 5] [--repeat 20]
        [--threads N] [--clock wall|cpu]

`--clock cpu` times the calling thread's CPU time instead of the wall clock (with
--threads 1 the kernel runs on that thread): on a machine shared with other work, the
load then does not land in the figures (cache sharing still does).

Shapes: GPT small's attention (batch 1, 8 heads, d 64, causal) at seq 128 and 512,
BERT small's (the same, bidirectional) at 128, and 8 query rows over 512 cached keys
(a short prompt chunk, bidirectional). "8x32" is the kernel before the space (its
blocks of 8 rows by 32 keys); "default" is this host's default schedule.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from tensorc.backends.llvm import attention as A
from tensorc.backends.llvm import attention_schedule as S
from tensorc.backends.llvm.jit import target

SHAPES = {"gpt seq 128": (8, 128, 128, 64, 64, True, "none"),
          "gpt seq 512": (8, 512, 512, 64, 64, True, "none"),
          "bert seq 128": (8, 128, 128, 64, 64, False, "none"),
          "t 8, s 512": (8, 8, 512, 64, 64, False, "none")}


def name(sched: dict) -> str:
    return f"{sched['br']}x{sched['bc']}" if sched["path"] == "flash" \
        else f"decode g{sched['group']}"


def seconds(key: tuple, sched: dict, repeat: int, threads, clock) -> float:
    """`A.measure` with a thread count and a clock."""
    q, k, v, mask, out = S.operands(key)
    run = A.bind(q, k, v, mask, 1 / math.sqrt(key[3]), bool(key[5]), threads=threads,
                 out=out, schedule=sched)
    run()
    times = []
    for _ in range(repeat):
        t0 = clock()
        run()
        times.append(clock() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu times the calling thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"CPU: {target().cpu}, AVX-512: {S._wide()}, "
          f"threads: {args.threads or A.num_threads()}, clock: {args.clock}")
    rows: dict[str, dict[str, float]] = {}
    best: dict[str, str] = {}
    for label, shape in SHAPES.items():
        key = S.key(*shape)
        cands = S.candidates(key)
        times: dict[str, list[float]] = {name(c): [] for c in cands}
        for _ in range(args.rounds):
            for c in cands:
                times[name(c)].append(seconds(key, c, args.repeat, args.threads, clock))
        rows[label] = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        rows[label]["default"] = rows[label][name(S.default(key))]
        best[label] = min((n for n in times), key=rows[label].get)
    cols = ["8x32", "default"] + sorted({n for r in rows.values() for n in r} - {"8x32",
                                                                              "default"})
    print("| shape | " + " | ".join(cols) + " | best | best vs 8x32 |")
    print("|---" * (len(cols) + 3) + "|")
    for label, r in rows.items():
        cells = [f"{r[c]:.3f}" if c in r else "" for c in cols]
        print(f"| {label} | " + " | ".join(cells)
              + f" | {best[label]} | {r['8x32'] / r[best[label]]:.2f}x |")


if __name__ == "__main__":
    main()
