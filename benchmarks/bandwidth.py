"""This machine's memory bandwidth for a streaming read, in GB/s (1e9 bytes per second).

    .venv/bin/python benchmarks/bandwidth.py [--mb 512] [--threads 2]

`read_bandwidth()` reduces a float32 array far larger than the caches (512 MiB by
default) with numpy's `maximum.reduce`, one slice per thread (numpy's reductions
release the GIL, so the threads really read at once), and keeps the best of a few
passes: the figure a kernel that reads each weight once per call can approach. A
benchmark imports it to report its own figures as a share of it. A max, not a sum:
numpy's float32 sum is pairwise and costs more than the read (7.6 vs 14 GB/s on one
core of the Xeon this was written on, 9.8 vs 23 GB/s on two). The array is written
once first (its pages then exist), and the first pass is not counted.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np


def read_bandwidth(mb: int = 512, threads: int | None = None, passes: int = 8) -> float:
    """Best streaming-read rate over `passes` passes, GB/s, on `threads` threads
    (default: TENSORC_NUM_THREADS, else the cores this process may use)."""
    if threads is None:
        threads = int(os.environ.get("TENSORC_NUM_THREADS") or len(os.sched_getaffinity(0)))
    n = (mb << 20) // 4
    data = np.ones(n, np.float32)
    cuts = [n * i // threads for i in range(threads + 1)]
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    sink = [0.0] * threads

    def read(i: int) -> None:
        sink[i] = float(np.maximum.reduce(parts[i]))

    best = 0.0
    for p in range(passes + 1):
        t0 = time.perf_counter()
        if threads == 1:
            read(0)
        else:
            ts = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        sec = time.perf_counter() - t0
        if p:   # the first pass warms up the threads and the TLB
            best = max(best, data.nbytes / sec / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="array size in MiB")
    ap.add_argument("--threads", type=int, help="reading threads (default: all cores)")
    args = ap.parse_args()
    for t in sorted({1, args.threads or len(os.sched_getaffinity(0))}):
        print(f"{t} thread{'s' if t > 1 else ''}: {read_bandwidth(args.mb, t):.1f} GB/s "
              f"({args.mb} MiB float32 array, numpy maximum.reduce)")


if __name__ == "__main__":
    main()
