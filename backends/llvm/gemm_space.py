"""The GEMM's schedule space: which `Tile`s (micro-tile rows and width, K and row
blocking) a product may run, the host's default, and how the tuner times one.

A key is (m, k, n, per_call): m rows times a [k, n] B that is a packed weight
(per_call 0) or packed on every call (1). The candidates are the micro-tiles whose
accumulators, the B vectors of one k and the broadcast of A fit the host's vector
registers (16 on AVX2, 32 on AVX-512; a 16-lane vector takes two AVX2 registers),
largest first, then other K and row blockings around the best-known ones. The tuner
times them in that order within its budget (`tuning.py`), so the list is short and the
promising ones come first.

Results: the micro-tile's shape does not change any sum's order; kc does (C adds one
partial sum per K block), so tiles with another kc agree within float32 rounding of
the blocked sums (relative 1e-6 on the products we test), not bit for bit.
"""

from __future__ import annotations

import time

import numpy as np

from . import tuning
from .gemm_ir import AVX2_TILE, AVX512_TILE, KC_MAX, MC_MAX, Tile
from .jit import target


def _avx512() -> bool:
    return "+avx512f" in target().features.split(",")


def _registers() -> tuple[int, int]:
    """(vector registers, registers one 16-lane vector takes) on this host."""
    return (32, 1) if _avx512() else (16, 2)


def _fits(mr: int, nv: int) -> bool:
    regs, per = _registers()
    return (mr * nv + nv) * per + 1 <= regs


def default(key) -> dict:
    """The hand-picked tile for this host's vector registers (the key does not matter;
    threads split the work by the hand-made rule)."""
    return (AVX512_TILE if _avx512() else AVX2_TILE)._asdict()


def _mc(mr: int, target_rows: int) -> int:
    """A row block near target_rows that is a multiple of mr (the packed A's panels)."""
    return min(MC_MAX // mr * mr, max(mr, round(target_rows / mr) * mr))


def candidates(key) -> list[dict]:
    """Legal tiles for key, most promising first (the default first)."""
    m, k, n, per_call = key
    base = Tile(**default(key))
    shapes = sorted(((mr, nv) for nv in (1, 2) for mr in range(2, 17) if _fits(mr, nv)),
                    key=lambda s: -s[0] * s[1])[:6]   # most accumulators first
    tiles = [base]
    tiles += [Tile(mr, nv, base.kc, _mc(mr, base.mc)) for mr, nv in shapes]
    splits = ["shared", "rows", "panels"] + ["blocks"] * per_call
    for mr, nv in shapes[:2]:   # blockings and splits around the two largest micro-tiles
        for kc in (128, 384, KC_MAX):
            if kc < k + 128:   # a kc far beyond K changes nothing
                tiles.append(Tile(mr, nv, kc, _mc(mr, base.mc)))
        for rows in (48, 96, 192, MC_MAX):
            if rows < m + 32:
                tiles.append(Tile(mr, nv, base.kc, _mc(mr, rows)))
        tiles += [Tile(mr, nv, base.kc, _mc(mr, base.mc), split) for split in splits]
    seen, out = set(), []
    for t in tiles:
        if t not in seen and t.kc <= KC_MAX and t.mc <= MC_MAX and t.mc % t.mr == 0:
            seen.add(t)
            out.append(t._asdict())
    return out


def register(bind, packed_b) -> tuning.Space:
    """The space, registered with the tuner, timing products through `gemm.bind` and
    `gemm.PackedB` (passed in: gemm.py asks this module for its tiles)."""
    cache: dict = {}

    def operands(key):   # random operands, made once per key
        if cache.get("key") != key:
            m, k, n, per_call = key
            rng = np.random.default_rng(0)
            a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
            cache.clear()
            cache.update(key=key, ops=(a, b if per_call else packed_b(b),
                                       np.empty((m, n), np.float32)))
        return cache["ops"]

    def measure(key, schedule: dict, repeat: int) -> float:
        """Median seconds of `repeat` bound calls at key on `schedule`'s tile."""
        a, b, out = operands(key)
        call = bind(a, b, out, tile=Tile(**schedule))
        call()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return tuning.register(tuning.Space("gemm", default, candidates, measure))
