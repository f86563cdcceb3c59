"""The flash-attention kernel's schedule space (`tuning.Space` "attention").

A schedule picks the kernel and its register tile:

    {"path": "flash", "br": 8, "bc": 32}    query rows per block, keys per tile
    {"path": "decode", "group": 4}          16-lane chunks of a row held at once

`path` "decode" (the one-row-at-a-time kernel) is a candidate for at most DECODE_MAX
query rows; the default takes it up to DECODE_T. The flash block holds br x bc / 16
score accumulators of 16 lanes: 16 zmm by default, which on a host without AVX-512
become 32 ymm (twice the register file), so smaller tiles are among the candidates.
Every candidate computes the same thing: the scores' and P @ V's sums run in the same
order whatever br is; bc (the online softmax's step) and group (a dot product's
partial sums) change the float32 rounding only (the tests hold each to 1e-4).

The key is what the kernel's speed depends on, rounded so that a model's shapes and
a growing decode cache reuse a few keys: (batch x heads, t, s, d, dv, causal, mask
kind) with batch x heads and s rounded up to powers of two, t too past DECODE_MAX.

`attention.py` registers the space (its `measure` times the bound kernel at a key's
shape on `operands`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from tensorc.errors import TensorcError

from .jit import target

BR, BC = 8, 32   # query rows per block, keys per tile (the GEMM's 8 x 32 micro-tile):
                 # the default schedule's (the sparse kernel's always)
BR_NARROW = 4    # the default's rows per block on a host without AVX-512
DECODE_T = 4     # query rows up to which the default runs `_decode_kernel`
GROUP = 4        # the default decode schedule's chunks of a row in registers
DECODE_MAX = 16  # query rows up to which the decode kernel is a candidate
TILES = ((8, 32), (4, 32), (8, 16), (4, 16), (6, 16), (12, 32))   # (br, bc) candidates
GROUPS = (4, 2, 1)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def key(heads: int, t: int, s: int, d: int, dv: int, causal: bool, kind: str) -> tuple:
    """The tuning key of a call: `heads` is batch x query heads."""
    return (_pow2(heads), int(t) if t <= DECODE_MAX else _pow2(t), _pow2(max(s, 16)),
            int(d), int(dv), int(bool(causal)), kind)


def _wide() -> bool:
    """Whether the host has AVX-512 (16-lane vectors in one register)."""
    return "+avx512f" in target().features.split(",")


def default(k: tuple) -> dict:
    """The hand-picked schedule: 8 x 32 flash blocks, or 4 x 32 without AVX-512
    (where 8 x 32's accumulators spill: 1.4-1.7x slower on a Zen 3, and the same
    results bit for bit, see the module's note); the decode kernel up to DECODE_T."""
    if k[1] <= DECODE_T:
        return {"path": "decode", "group": GROUP}
    return {"path": "flash", "br": BR if _wide() else BR_NARROW, "bc": BC}


def candidates(k: tuple) -> list[dict]:
    """The legal schedules for key k, the default first, then the tiles that suit the
    host's registers first (small ones without AVX-512)."""
    t = k[1]
    wide = _wide()
    tiles = sorted(TILES, key=lambda x: x[0] * x[1] * (-1 if wide else 1))
    flash = [{"path": "flash", "br": br, "bc": bc} for br, bc in tiles
             if br <= max(t, 8) or (br, bc) == (BR, BC)]
    decode = [{"path": "decode", "group": g} for g in GROUPS] if t <= DECODE_MAX else []
    out = [default(k)]
    for c in (decode + flash if t <= DECODE_T else flash + decode):
        if c not in out:
            out.append(c)
    return out


def checked(sched: dict) -> dict:
    """`sched` if the kernels can run it (one clear error if not)."""
    ok = isinstance(sched, dict) and (
        sched.get("path") == "flash" and set(sched) == {"path", "br", "bc"}
        and sched["bc"] in (16, 32) and isinstance(sched["br"], int) and 1 <= sched["br"] <= 16
        or sched.get("path") == "decode" and set(sched) == {"path", "group"}
        and sched["group"] in (1, 2, 4))
    if not ok:
        raise TensorcError(f"attention: not a schedule of the attention kernels: {sched!r} "
                           f"(e.g. {default((1, 64, 64, 64, 64, 0, 'none'))})")
    return sched


def module_params(sched: dict) -> tuple[int, int, int]:
    """(br, bc, group) of the module that runs `sched` (the other kernel's at the
    default), so that schedules differing only in what they do not run share it."""
    return (sched.get("br", BR), sched.get("bc", BC), sched.get("group", GROUP))


_inputs: dict = {}   # the last measured key's operands


def operands(k: tuple) -> tuple:
    """Random (q, k, v, mask, out) of key k's shape (batch 1), made once per key."""
    if k not in _inputs:
        heads, t, s, d, dv, _, kind = k
        rng = np.random.default_rng(0)
        q, kk = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for n in (t, s))
        v = rng.standard_normal((1, heads, s, dv), dtype=np.float32)
        mask = None if kind == "none" else rng.random((1, 1, t, s)) > 0.2 if kind == "keep" \
            else rng.standard_normal((1, 1, t, s), dtype=np.float32)
        _inputs.clear()
        _inputs[k] = (q, kk, v, mask, np.empty((1, heads, t, dv), np.float32))
    return _inputs[k]


def median_seconds(run, repeat: int) -> float:
    """Median seconds of `repeat` calls of run() (after one that compiles and warms)."""
    run()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
