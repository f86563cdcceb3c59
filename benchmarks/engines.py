"""What the benchmark scripts share: engines in worker processes that take turns, and
the facts of the machine they print.

Each engine lives in its own process (BLAS, ONNX Runtime and tensorc pool threads spin
after a call and would slow the next engine in the same process); the engines start one
at a time and then take turns, so a change in machine load hits all of them alike.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time


def answer(proc: subprocess.Popen):
    """The worker's next JSON line, or why it has none (its last stderr line)."""
    line = proc.stdout.readline()
    if not line:
        return "failed: " + (proc.stderr.read().strip().splitlines() or ["?"])[-1]
    return json.loads(line)


def start_engines(starters: dict) -> tuple[dict, dict]:
    """Start each engine's worker (`starters`: key -> a function returning its Popen) and
    wait for its "ready"; returns the running ones and, for the others, why not."""
    procs, failed = {}, {}
    for key, start in starters.items():   # one at a time: no contention
        proc = start()
        status = answer(proc)
        if status == "ready":
            procs[key] = proc
        else:
            failed[key] = status
            proc.kill()
    return procs, failed


def take_turns(procs: dict, rounds: int, request, pause: float = 0.3) -> dict[str, list]:
    """`rounds` rounds in which each engine in turn gets the line `request(key)` and
    answers; then the workers are closed. Returns each engine's answers."""
    got = {key: [] for key in procs}
    for _ in range(rounds):
        for key, proc in procs.items():
            proc.stdin.write(request(key) + "\n")
            proc.stdin.flush()
            got[key].append(answer(proc))
            time.sleep(pause)   # let spinning threads go idle before the next engine
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return got


def serve(fn, extra: dict | None = None) -> None:
    """A worker's loop: say "ready", then answer each "run N WARMUP" line from the parent
    with the seconds of N timed calls of `fn`, after WARMUP untimed ones (with `extra`,
    as {"times": [...], **extra})."""
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        _, runs, warmup = line.split()
        for _ in range(int(warmup)):
            fn()
        times = []
        for _ in range(int(runs)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(json.dumps(times if extra is None else {"times": times, **extra}), flush=True)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpu_model() -> str:
    """lscpu's model name and the widest vector ISA."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('Model name', 'unknown').strip()} ({isa})"
