"""A device mesh (ranks laid out on named axes) and a tensor's sharding over it.

Axes are `pp` (pipeline stages), `dp` (data-parallel replicas) and `tp` (tensor-parallel
shards), outermost to innermost: ranks that differ only in `tp` are neighbours, as in
Megatron-LM, so the chattiest groups sit closest (on one node, over NVLink).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import TensorcError

AXES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Mesh:
    """Axis sizes in `AXES` order; an axis left out has size 1."""

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self):
        for a in AXES:
            n = getattr(self, a)
            if not isinstance(n, int) or n < 1:
                raise TensorcError(f"mesh axis {a}={n!r} should be a positive integer")

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """'tp=2,dp=2,pp=2' (any order; missing axes are 1)."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, n = part.partition("=")
            if not eq or name not in AXES or not n.isdigit() or name in sizes:
                raise TensorcError(f"bad mesh {text!r}: write axis=size pairs over "
                                   f"{', '.join(AXES)}, e.g. tp=2,dp=2")
            sizes[name] = int(n)
        return cls(**sizes)

    @property
    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    @property
    def size(self) -> int:
        return math.prod(self.sizes.values())

    def coords(self, rank: int) -> dict[str, int]:
        """The rank's index along each axis."""
        if not 0 <= rank < self.size:
            raise TensorcError(f"rank {rank} is outside a mesh of {self.size} ({self})")
        out = {}
        for a in reversed(AXES):
            rank, out[a] = divmod(rank, getattr(self, a))
        return {a: out[a] for a in AXES}

    def rank(self, coords: dict[str, int]) -> int:
        r = 0
        for a in AXES:
            r = r * getattr(self, a) + coords.get(a, 0)
        return r

    def group(self, rank: int, axis: str) -> list[int]:
        """The ranks that share every coordinate with `rank` but `axis`, in axis order."""
        c = self.coords(rank)
        return [self.rank({**c, axis: i}) for i in range(getattr(self, axis))]

    def __str__(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.sizes.items() if n > 1) or "single"


@dataclass(frozen=True)
class Sharding:
    """How one tensor lies on the mesh: per tensor dim, the mesh axis it is split over
    (None: whole on every rank), and the axes over which each rank holds only a partial
    sum (GSPMD's "partial": a row-parallel matmul's output before its all-reduce)."""

    dims: tuple[str | None, ...]
    partial: frozenset[str] = frozenset()

    @classmethod
    def replicated(cls, rank: int) -> Sharding:
        return cls((None,) * rank)

    def local_shape(self, shape: tuple, mesh: Mesh) -> tuple:
        out = []
        for d, a in zip(shape, self.dims, strict=True):
            n = 1 if a is None else getattr(mesh, a)
            if n > 1 and not (isinstance(d, int) and d % n == 0):
                raise TensorcError(f"dim {d} cannot be split {n} ways over mesh axis {a}")
            out.append(d // n if n > 1 else d)
        return tuple(out)

    def __str__(self) -> str:
        dims = ",".join(a or "-" for a in self.dims)
        return f"[{dims}]" + (f" partial({','.join(sorted(self.partial))})"
                              if self.partial else "")
