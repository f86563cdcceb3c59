"""Pipeline schedules: the order of micro-batch forwards and backwards on each stage
(GPipe; 1F1B as in PipeDream-Flush and Megatron-LM), a simulator that lays them on a
timeline from per-stage costs (makespan, bubble, micro-batches in flight), and the
timeline as text or a picture. Pure arithmetic: the runtime (`pipeline.py`) follows a
schedule, `tensorc plan` and the docs reason with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..errors import TensorcError


class PipelineError(TensorcError):
    """A model, mesh or schedule that the pipeline cannot run."""


@dataclasses.dataclass(frozen=True)
class Action:
    """The forward ("F") or backward ("B") of one micro-batch on a stage."""

    kind: str
    micro: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}"


def _check(p: int, m: int) -> None:
    if not (isinstance(p, int) and isinstance(m, int) and p >= 1 and m >= 1):
        raise PipelineError(f"a schedule needs >= 1 stages and micro-batches, not p={p!r}, "
                            f"m={m!r}")


def gpipe(p: int, m: int, backward: bool = True) -> list[list[Action]]:
    """GPipe: every stage runs all forwards, then all backwards (last micro-batch first,
    as the last stage finishes it first). Without `backward`: inference."""
    _check(p, m)
    fwd = [Action("F", i) for i in range(m)]
    bwd = [Action("B", i) for i in reversed(range(m))] if backward else []
    return [fwd + bwd for _ in range(p)]


def one_f_one_b(p: int, m: int, backward: bool = True) -> list[list[Action]]:
    """1F1B (PipeDream-Flush, Megatron-LM): stage s runs p-s-1 warm-up forwards, then
    alternates one forward and one backward, then the remaining backwards; so stage s
    holds at most p-s micro-batches' activations, not GPipe's m. The bubble is GPipe's."""
    _check(p, m)
    if not backward:
        return gpipe(p, m, backward=False)
    out = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [Action("F", i) for i in range(warm)]
        for i in range(m - warm):
            acts += [Action("F", warm + i), Action("B", i)]
        acts += [Action("B", i) for i in range(m - warm, m)]
        out.append(acts)
    return out


SCHEDULES: dict[str, Callable[..., list[list[Action]]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b}


def get_schedule(name: str) -> Callable[..., list[list[Action]]]:
    if name not in SCHEDULES:
        raise PipelineError(f"unknown pipeline schedule {name!r} (known: "
                            f"{', '.join(SCHEDULES)})")
    return SCHEDULES[name]


def depends(s: int, a: Action, p: int) -> list[tuple[int, Action]]:
    """What (stage, action) must finish before stage s runs `a`: its input from the stage
    before (forward) or its gradient from the stage after (backward), and a backward
    its own forward."""
    if a.kind == "F":
        return [(s - 1, a)] if s > 0 else []
    return [(s + 1, a)] * (s < p - 1) + [(s, Action("F", a.micro))]


@dataclasses.dataclass
class Timeline:
    """Where every action ran: per stage, (start, end, action) in order."""

    rows: list[list[tuple[float, float, Action]]]

    @property
    def makespan(self) -> float:
        return max(end for row in self.rows for _, end, _ in row)

    @property
    def bubble(self) -> float:
        """The fraction of stage-time spent idle."""
        busy = sum(end - start for row in self.rows for start, end, _ in row)
        return 1.0 - busy / (len(self.rows) * self.makespan)

    def in_flight(self) -> list[int]:
        """Per stage, the most micro-batches forwarded and not yet backwarded at once
        (whose activations the stage keeps)."""
        peaks = []
        for row in self.rows:
            now = peak = 0
            for _, _, a in row:
                now += 1 if a.kind == "F" else -1
                peak = max(peak, now)
            peaks.append(peak)
        return peaks


def simulate(schedule: list[list[Action]], forward: float | list[float] = 1.0,
             backward: float | list[float] | None = None) -> Timeline:
    """Place each stage's actions in its order, each as soon as its stage is free and
    what it depends on has finished. `forward`/`backward`: seconds (or units) per
    micro-batch, one number or one per stage; backward defaults to twice forward."""
    p = len(schedule)

    def per_stage(x, what):
        xs = list(x) if isinstance(x, (list, tuple)) else [x] * p
        if len(xs) != p or any(not v > 0 for v in xs):
            raise PipelineError(f"{what} costs should be {p} positive numbers, got {x!r}")
        return xs
    fwd = per_stage(forward, "forward")
    bwd = per_stage([2 * f for f in fwd] if backward is None else backward, "backward")
    done: dict[tuple[int, Action], float] = {}
    rows: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    nxt, free = [0] * p, [0.0] * p
    while any(nxt[s] < len(schedule[s]) for s in range(p)):
        moved = False
        for s in range(p):
            while nxt[s] < len(schedule[s]):
                a = schedule[s][nxt[s]]
                deps = depends(s, a, p)
                if not all(d in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                end = start + (fwd[s] if a.kind == "F" else bwd[s])
                rows[s].append((start, end, a))
                done[(s, a)], free[s] = end, end
                nxt[s] += 1
                moved = True
        if not moved:
            stuck = ", ".join(f"stage {s}: {schedule[s][nxt[s]]}" for s in range(p)
                              if nxt[s] < len(schedule[s]))
            raise PipelineError(f"the schedule deadlocks (waiting: {stuck})")
    return Timeline(rows)


def timeline_text(tl: Timeline) -> str:
    """Rows per stage on a grid of the shortest action's duration: an action's label
    in its first cell, '--' in the cells it goes on, '.' idle. Then the bubble."""
    q = min(end - start for row in tl.rows for start, end, _ in row)
    cells = round(tl.makespan / q)
    width = max(len(str(a)) for row in tl.rows for _, _, a in row)
    lines = []
    for s, row in enumerate(tl.rows):
        grid = ["." for _ in range(cells)]
        for start, end, a in row:
            first, last = round(start / q), round(end / q)
            grid[first] = str(a)
            for c in range(first + 1, last):
                grid[c] = "-" * width
        lines.append(f"stage {s} | " + " ".join(c.ljust(width) for c in grid).rstrip())
    m = sum(a.kind == "F" for _, _, a in tl.rows[0])
    lines.append(f"p={len(tl.rows)} stages, m={m} micro-batches: makespan "
                 f"{tl.makespan:g}, bubble {tl.bubble:.1%}")
    return "\n".join(lines)


def timeline_png(tl: Timeline, path: str, title: str | None = None) -> None:
    """The timeline as a PNG (matplotlib, the `train` extra): a bar per action."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TensorcError("the timeline plot needs matplotlib: pip install 'tensorc[train]'") \
            from None
    p = len(tl.rows)
    fig, ax = plt.subplots(figsize=(max(6.0, tl.makespan * 0.4), 0.6 * p + 1.2))
    for s, row in enumerate(tl.rows):
        for start, end, a in row:
            ax.barh(s, end - start, left=start, height=0.8, edgecolor="black",
                    color="#4c78a8" if a.kind == "F" else "#f58518")
            ax.text((start + end) / 2, s, str(a), ha="center", va="center", fontsize=7,
                    color="white")
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(title or f"bubble {tl.bubble:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
