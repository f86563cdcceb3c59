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

`tune(items, budget_s)` times candidates for a set of (kernel, key) pairs within a
time budget (successive halving, never exhaustive: the space's order is its cost
model), keeps a candidate only where it beats the default by `MARGIN`, and saves the
table to this host's cache file (`cache_path()`: JSON, written atomically, read lazily
on the first `schedule()` call). `TENSORC_TUNE_CACHE=off` ignores the file (neither
read nor written): every kernel runs its default unless tuned in this process.
A bound call keeps the schedule it was bound with: compile again to get a new one.
See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

Key = tuple            # a kernel's shape key: ints and strings, e.g. (m, k, n, "pa")
Schedule = dict        # {"mr": 6, "nr": 16, ...}: JSON-able

MARGIN = 0.03          # a candidate must beat the default by 3 % (measured again) to win
FIRST_ROUND = 32       # at most this many candidates get a first timing (the space's first)
_FORMAT = 1            # the cache file's version
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Space:
    """One tunable kernel family."""
    name: str
    default: Callable[[Key], Schedule]             # the hand-picked schedule for key
    candidates: Callable[[Key], list[Schedule]]    # legal schedules, most promising first
    measure: Callable[[Key, Schedule, int], float]  # median seconds of `repeat` calls


SPACES: dict[str, Space] = {}
# this host's table: the best schedule where it is not the default (the contract's form)
_tuned: dict[tuple[str, Key], Schedule] = {}
_times: dict[tuple[str, Key], tuple] = {}      # verdicts: (seconds, the default's seconds)
_unchecked: set = set()                        # _tuned keys read from the file, not checked
_rejected: set = set()                         # file entries that were not candidates
_loaded = False                                # the cache file was read (or is off)
_use_tuned = [True]                            # False inside `defaults()`
_recording: list[set] = []                     # active `record()` sets


def register(space: Space) -> Space:
    SPACES[space.name] = space
    return space


def schedule(kernel: str, key: Key) -> Schedule:
    """The schedule kernel `kernel` runs at `key` on this host."""
    for seen in _recording:
        seen.add((kernel, key))
    space = SPACES[kernel]
    best = None
    if _use_tuned[-1]:
        _load()
        best = _tuned.get((kernel, key))
        if best is not None and (kernel, key) in _unchecked:
            _unchecked.discard((kernel, key))
            if best not in space.candidates(key):   # stale or edited: ignored
                log.warning("tuning cache: %s %s: %s is not a candidate here; using the "
                            "default", kernel, key, best)
                _forget((kernel, key))
                _rejected.add((kernel, key))
                best = None
    return dict(best) if best is not None else space.default(key)


def tuned(kernel: str, key: Key) -> bool:
    """Whether this host's table has a verdict for (kernel, key) (even "the default")."""
    _load()
    return (kernel, key) in _times


@contextlib.contextmanager
def record() -> Iterator[set]:
    """The (kernel, key) pairs asked for inside the block (what a model runs)."""
    seen: set = set()
    _recording.append(seen)
    try:
        yield seen
    finally:
        _recording.remove(seen)


@contextlib.contextmanager
def defaults() -> Iterator[None]:
    """Every `schedule()` inside the block answers the default (the untuned baseline)."""
    _use_tuned.append(False)
    try:
        yield
    finally:
        _use_tuned.pop()


def _forget(item) -> None:
    _tuned.pop(item, None)
    _times.pop(item, None)
    _unchecked.discard(item)


# --- the per-host cache file -------------------------------------------------------------

def cache_enabled() -> bool:
    return os.environ.get("TENSORC_TUNE_CACHE", "").lower() not in ("off", "0", "no")


def host() -> dict:
    """What the cache file is per: the JIT's target (triple, CPU, features, llvmlite)."""
    import llvmlite

    from . import jit
    t = jit.target()
    return {"triple": t.triple, "cpu": t.cpu, "features": t.features,
            "llvmlite": llvmlite.__version__}


def cache_path() -> Path:
    from . import jit
    digest = hashlib.sha256(jit.target().fingerprint.encode()).hexdigest()[:16]
    return jit.cache_dir() / f"tuning-{digest}.json"


def _key(k) -> Key:
    """A JSON list back into a key (nested lists into tuples)."""
    return tuple(_key(x) if isinstance(x, list) else x for x in k)


def _load() -> None:
    """Read this host's cache file once."""
    global _loaded
    if not _loaded:
        _loaded = True
        _merge_file()


def _merge_file() -> None:
    """Add the file's verdicts this process has none of (what it tuned itself wins)."""
    for item, (best, seconds, default_seconds) in _read().items():
        if item not in _times and item not in _rejected:
            _times[item] = (seconds, default_seconds)
            if best is not None:
                _tuned[item] = best
                _unchecked.add(item)


def _read() -> dict:
    """This host's cache file: (kernel, key) -> (schedule or None: the default won,
    seconds, the default's seconds). An unreadable one is ignored with a warning."""
    path = cache_path()
    if not cache_enabled() or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
        table = {}
        for e in data["entries"]:
            s = e["schedule"]
            if not (s is None or isinstance(s, dict)) or not isinstance(e["kernel"], str):
                raise ValueError("an entry is not a (kernel, key, schedule)")
            table[e["kernel"], _key(e["key"])] = (s, float(e["seconds"]),
                                                  float(e["default_seconds"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring the tuning cache %s: %s", path, " ".join(str(err).split()))
        return {}
    return table


def entries() -> list[dict]:
    """This host's verdicts, as the cache file and `tensorc tune --show` give them."""
    _load()
    return [{"kernel": k, "key": list(key), "schedule": _tuned.get((k, key)),
             "seconds": t, "default_seconds": t0}
            for (k, key), (t, t0) in sorted(_times.items(), key=lambda kv: repr(kv[0]))]


def save() -> Path | None:
    """Write this host's table (atomically: a temp file renamed into place), with what
    the file holds already (another process's verdicts too)."""
    global _loaded
    from tensorc.files import output_file
    if not cache_enabled():
        return None
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    _loaded = True
    _merge_file()
    with output_file(str(path), "w") as f:
        json.dump({"format": _FORMAT, "host": host(), "entries": entries()}, f, indent=1)
    return path


def clear() -> Path | None:
    """Forget this host's table (in memory and on disk)."""
    global _loaded
    for table in (_tuned, _times, _unchecked, _rejected):
        table.clear()
    _loaded = True
    path = cache_path()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return path
    return None


# --- the search --------------------------------------------------------------------------

@dataclass
class Result:
    kernel: str
    key: Key
    default: Schedule
    chosen: Schedule                # the default when nothing beat it by the margin
    default_s: float                # median seconds of one call, default schedule
    tuned_s: float                  # ... chosen schedule (both from the final comparison)
    tried: int = 0                  # candidates timed
    candidates: int = 0             # the space's candidates other than the default
    dropped: list[str] = field(default_factory=list)   # "schedule: why it failed"
    note: str = ""                  # why the search stopped early, if it did
    done: bool = False              # searched to a verdict (else the budget cut it short)

    @property
    def gain(self) -> float:
        return self.default_s / self.tuned_s if self.tuned_s > 0 else 1.0

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "key": list(self.key), "default": self.default,
                "chosen": self.chosen, "default_ms": _ms(self.default_s),
                "tuned_ms": _ms(self.tuned_s), "gain": self.gain, "tried": self.tried,
                "candidates": self.candidates, "dropped": self.dropped, "note": self.note}


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1e3   # JSON has no NaN


class _Clock:
    def __init__(self, budget_s: float):
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def tune(items: Iterable[tuple[str, Key]], budget_s: float, report: Callable | None = None,
         margin: float = MARGIN) -> list[Result]:
    """Time candidates for each (kernel, key) within `budget_s` seconds in all, keep the
    winners in this host's table and save it. The budget is split over the items in
    proportion to their default's time (measured first); they are searched heaviest first,
    and what one leaves of its share flows on to the others."""
    items = sorted({(k, key) for k, key in items if k in SPACES}, key=repr)
    clock = _Clock(budget_s)
    base: dict = {}   # item -> (seconds a call, wall seconds a repeat of measure), or error
    for item in items:   # the defaults first: they weigh the budget
        if clock.left() <= 0:
            break
        space = SPACES[item[0]]
        try:
            start = time.perf_counter()
            t = _measure(space, item[1], space.default(item[1]), 3)
            base[item] = (t, (time.perf_counter() - start) / 3)
        except Exception as e:   # a default that cannot run: nothing to compare against
            base[item] = e
    # the heaviest first, each its share of what is left: what one leaves flows on
    timed = sorted((i for i in items if isinstance(base.get(i), tuple)),
                   key=lambda i: -base[i][0])
    results = []
    for n, item in enumerate(timed):
        space, key = SPACES[item[0]], item[1]
        share = max(clock.left(), 0) * base[item][0] / sum(base[i][0] for i in timed[n:])
        try:
            result = _search(space, key, *base[item], share, clock, margin)
        except Exception as e:   # a broken space must not stop the others (or a compile)
            default = space.default(key)
            result = Result(item[0], key, default, default, base[item][0], base[item][0],
                            note=f"search failed: {_why(e)}")
        if result.done:   # a verdict, "the default" included: not searched again
            _forget(item)
            _times[item] = (result.tuned_s, result.default_s)
            if result.chosen != result.default:
                _tuned[item] = result.chosen
        results.append(result)
        if report:
            report(result)
    for item in items:
        if item not in timed:
            default = SPACES[item[0]].default(item[1])
            results.append(Result(item[0], item[1], default, default, math.nan, math.nan,
                                  note="budget spent before the default was timed"
                                  if item not in base else f"the default failed: "
                                  f"{_why(base[item])}"))
            if report:
                report(results[-1])
    if any(r.done for r in results):
        save()
    return results


def _measure(space: Space, key: Key, s: Schedule, repeat: int) -> float:
    t = space.measure(key, dict(s), repeat)
    if not (float(t) > 0 and math.isfinite(t)):   # numpy floats too
        raise ValueError(f"measure gave {t!r}")
    return float(t)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]


def _search(space: Space, key: Key, t0: float, wall: float, share: float, clock: _Clock,
            margin: float) -> Result:
    """Successive halving over `key`'s candidates in `share` seconds: one cheap timing
    each (in the space's order, at most FIRST_ROUND of them and as many as half the share
    allows), then the best third again with three times the repeats, ...; then the best
    against the default, interleaved, best of each. `t0` is the default's seconds a call,
    `wall` what one repeat of its measure took (the time estimates)."""
    default = space.default(key)
    cands = [c for c in space.candidates(key) if c != default]
    result = Result(space.name, key, default, default, t0, t0, candidates=len(cands),
                    done=not cands)
    start = time.perf_counter()
    end = start + share

    def timing(i: int, repeat: int) -> float | None:
        try:
            return _measure(space, key, cands[i], repeat)
        except Exception as e:   # dropped, with the reason in the report
            result.dropped.append(f"{cands[i]}: {_why(e)}")
            return None

    timed: list[tuple[float, int]] = []   # (seconds, index into cands)
    for i in range(len(cands)):
        if i == FIRST_ROUND or time.perf_counter() >= start + share / 2:
            result.note = f"timed {i} of {len(cands)} candidates"
            break
        result.tried += 1
        t = timing(i, 1)
        if t is not None:
            timed.append((t, i))
    repeat = 1
    while len(timed) > 1:
        timed = sorted(timed)[:math.ceil(len(timed) / 3)]
        repeat *= 3
        if len(timed) == 1 or time.perf_counter() + 1.5 * len(timed) * repeat * wall > end:
            break   # what is left of the share is for the final check
        timed = [(t, i) for i in (i for _, i in timed) if (t := timing(i, repeat)) is not None]
    if not timed:
        result.done = not result.note   # every candidate failed: a verdict too
        return result
    t_best, i_best = min(timed)
    best = cands[i_best]
    if t_best > t0 * 1.1:   # clearly slower than the default even at its best: done
        result.done = True
        return result
    ours: list[float] = []
    theirs: list[float] = []
    repeat = 3
    while len(ours) < 5 and (not ours or time.perf_counter() < end) \
            and clock.left() > 2 * repeat * wall:
        try:   # interleaved, so that drift favours neither; best of each
            ours.append(_measure(space, key, default, repeat))
            theirs.append(_measure(space, key, best, repeat))
        except Exception as e:
            result.dropped.append(f"{best}: {_why(e)}")
            return result
    if not theirs:
        result.note = "budget spent before the final check: kept the default"
        return result
    result.default_s = result.tuned_s = min(ours)
    result.done = True
    if min(theirs) < min(ours) * (1 - margin):
        result.chosen, result.tuned_s = best, min(theirs)
    return result


def tune_pending(seen: Iterable[tuple[str, Key]], budget_s: float,
                 report: Callable | None = None) -> list[Result]:
    """Tune those of `seen` this host has no verdict for (TENSORC_TUNE=1's first call)."""
    todo = [item for item in seen if item[0] in SPACES and not tuned(*item)]
    return tune(todo, budget_s, report) if todo else []


def budget_from_env() -> float:
    """TENSORC_TUNE_BUDGET seconds (default 60)."""
    from tensorc.errors import TensorcError
    text = os.environ.get("TENSORC_TUNE_BUDGET", "60")
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not budget > 0 or not math.isfinite(budget):
        raise TensorcError(f"TENSORC_TUNE_BUDGET must be a positive number of seconds, "
                           f"got {text!r}")
    return budget

