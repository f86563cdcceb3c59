"""The generated kernels' schedules (`backends/llvm/loop_tuning.py`): LLVM's own vector
width and interleave count (the default) against the tuned ones, on a model's kernels.

    .venv/bin/python benchmarks/loop_schedules.py [--model gpt:small] [--batch 1]
        [--seq 128] [--passes O2] [--repeat 200] [--rounds 3] [--margin 0.03]

Per kernel class the model asks for, the search `tuning.py` runs: every candidate's
representative kernel timed, the fastest picked where it beats the default by more
than `margin` (less is noise on a shared machine). Then each of the model's own kernels,
one thread, on the default, on its class's pick, and on its own best candidate (what a
per-kernel key would find), in microseconds: medians of `repeat` calls, the best of
`rounds` rounds (the rounds interleave the candidates, so a noisy neighbour hits all).
Last, the whole model's latency on the default and on the picks (the least of
interleaved rounds of 5 calls each).
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import tensorc
from tensorc import models
from tensorc.backends import get_backend
from tensorc.backends.llvm import LOWERING, codegen, loop_tuning, tuning
from tensorc.backends.llvm.pool import num_threads
from tensorc.backends.lowering import lower
from tensorc.passes import run_pipeline


def label(schedule: dict) -> str:
    return "llvm" if not schedule["width"] else f"w{schedule['width']}x{schedule['interleave']}"


def best_of(rounds: int, cands: list[dict], time_one) -> list[float]:
    """Per candidate, the least of `rounds` timings `time_one(candidate)`, the rounds
    each over every candidate in turn."""
    runs = [[time_one(c) for c in cands] for _ in range(rounds)]
    return [min(ts) for ts in zip(*runs, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt:small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--passes", default="O2")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--margin", type=float, default=0.03)
    args = ap.parse_args()
    name, _, preset = args.model.partition(":")
    model = models.get(name, preset or "tiny")
    feeds = model.example_inputs(batch=args.batch, seq=args.seq)
    graph = run_pipeline(tensorc.trace(model, **feeds), args.passes)
    program = lower(graph, {}, **LOWERING)
    steps = {}
    for s in program.steps:
        if hasattr(s, "kernel"):
            steps.setdefault(s.kernel.name, [s, 0])[1] += 1
    with tuning.record() as seen:
        codegen.render(program.kernels, loop_tuning.kernel_schedule)

    t = time.perf_counter()
    picks = {}
    for space, key in sorted(seen):
        sp = tuning.SPACES[space]
        cands = sp.candidates(key)
        times = best_of(args.rounds, cands, functools.partial(
            lambda key, c, measure: measure(key, c, args.repeat), key, measure=sp.measure))
        best = min(range(len(cands)), key=times.__getitem__)
        picks[(space, key)] = cands[best if times[best] < times[0] * (1 - args.margin) else 0]
        print(f"{space} {key}: representative default {times[0] * 1e6:.1f} us, "
              f"fastest {label(cands[best])} {times[best] * 1e6:.1f} us, "
              f"pick {label(picks[(space, key)])}")
    print(f"search: {time.perf_counter() - t:.1f} s for {len(seen)} keys\n")

    print(f"{'kernel':28} {'n':>3} {'key':34} {'default':>8} {'pick':>14} {'own best':>14}")
    for kname, (step, count) in steps.items():
        kernel = step.kernel
        found = loop_tuning.kernel_key(kernel)
        pick = picks.get(found, loop_tuning.DEFAULT) if found else loop_tuning.DEFAULT
        cands = loop_tuning.candidates(None)
        sizes = {kb.name: b.numel for kb, b in zip(kernel.buffers, step.args, strict=True)}
        arrays = loop_tuning.random_inputs(kernel, sizes)
        times = best_of(args.rounds, cands, functools.partial(
            lambda kernel, arrays, c: loop_tuning.run_kernel(kernel, c, arrays, args.repeat),
            kernel, arrays))
        own = min(range(len(cands)), key=times.__getitem__)
        at_pick = times[cands.index(pick)]
        print(f"{kname:28} {count:3} {str(found[1] if found else '-'):34} "
              f"{times[0] * 1e6:8.1f} {label(pick):>7} {at_pick * 1e6:6.1f} "
              f"{label(cands[own]):>7} {times[own] * 1e6:6.1f}")

    def compiled(schedules):
        """The model compiled with `schedules` ((space, key) -> schedule; else default)."""
        old = loop_tuning.kernel_schedule
        loop_tuning.kernel_schedule = lambda k: schedules.get(loop_tuning.kernel_key(k),
                                                              loop_tuning.DEFAULT)
        try:
            exe = get_backend("llvm").compile(graph)
            exe.run(feeds)   # lowered and compiled now, on these schedules
            return exe.run
        finally:
            loop_tuning.kernel_schedule = old
    runs = [compiled({}), compiled(picks)]
    best = [math.inf, math.inf]
    for _ in range(args.rounds * 3):   # interleaved: a load spike hits both
        for i, run in enumerate(runs):
            t = time.perf_counter()
            for _ in range(5):
                run(feeds)
            best[i] = min(best[i], (time.perf_counter() - t) / 5)
    print(f"\nmodel: default {best[0] * 1e3:.2f} ms, tuned {best[1] * 1e3:.2f} ms "
          f"({(best[0] / best[1] - 1) * 100:+.1f}%), {num_threads()} threads")

if __name__ == "__main__":
    main()
