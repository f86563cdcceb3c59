"""Per-host kernel schedules: what each tunable kernel may vary, and which variant this
CPU runs best.

A kernel family registers a `Space`: its default schedule for a shape key (the
hand-picked one, chosen by the host's features), the candidates worth timing (most
promising first, the default among them), and how to time one. Kernels ask
`schedule(kernel, key)` when they bind a call; the answer is the tuned best for this
host when the per-host cache has one, else the default. A schedule is a small dict of
ints and strings (it goes to JSON); a cached one is used only if it is still among
the space's candidates for that key, so a stale or edited cache cannot choose an
illegal kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Key = tuple            # a kernel's shape key: ints and strings, e.g. (m, k, n, "pa")
Schedule = dict        # {"mr": 6, "nr": 16, ...}: JSON-able


@dataclass(frozen=True)
class Space:
    """One tunable kernel family."""
    name: str
    default: Callable[[Key], Schedule]             # the hand-picked schedule for key
    candidates: Callable[[Key], list[Schedule]]    # legal schedules, most promising first
    measure: Callable[[Key, Schedule, int], float]  # median seconds of `repeat` calls


SPACES: dict[str, Space] = {}
_tuned: dict[tuple[str, Key], Schedule] = {}   # this host's best, from the cache
_recording: list[set] = []                     # active `record()` sets


def register(space: Space) -> Space:
    SPACES[space.name] = space
    return space


def schedule(kernel: str, key: Key) -> Schedule:
    """The schedule kernel `kernel` runs at `key` on this host."""
    for seen in _recording:
        seen.add((kernel, key))
    best = _tuned.get((kernel, key))
    return dict(best) if best is not None else SPACES[kernel].default(key)


@contextlib.contextmanager
def record() -> Iterator[set]:
    """The (kernel, key) pairs asked for inside the block (what a model runs)."""
    seen: set = set()
    _recording.append(seen)
    try:
        yield seen
    finally:
        _recording.remove(seen)
