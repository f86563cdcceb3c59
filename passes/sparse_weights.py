"""Weight pruning: `sparsify-weights` zeros the smallest-magnitude weights of matmuls.

``sparsify-weights:sparsity=0.9:pattern=unstructured|block4x1|2of4`` (after O2:
``O2,sparsify-weights:sparsity=0.9``) rewrites, per matrix, every float32 rank-2
constant that is only ever a matmul's B (directly or inside a `fused` region, as
`cast-weights` finds them):

- ``unstructured``: the round(sparsity x size) weights of least |w| in the matrix;
- ``block4x1``: blocks of 4 consecutive k in one column, the round(sparsity x blocks)
  blocks of least L2 norm (a last block of K % 4 rows counts as one);
- ``2:4`` (in a pipeline's text ``2of4``, as ``:`` separates arguments): in every 4
  consecutive k of a column the 2 of least |w|, then, above sparsity 0.5, the
  smallest of the rest over the matrix (still at most 2 of every 4).

The graph stays a plain matmul of a constant whose zeros are the sparsity: the llvm
backend packs such a weight for its sparse kernel when it is sparse enough
(`backends/llvm/sparse_gemm.py`); other backends multiply the zeros. The logits head
(a matmul whose result is, through bias adds and reshapes, an output; see
`quantize.heads`) stays dense unless ``head=1``: it is the most sensitive layer.
"""

from __future__ import annotations

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ir import Graph

from .quantize import heads
from .rewrite import copy_graph, graph_pass, inline_regions
from .weights import _weight_uses

PATTERNS = ("unstructured", "block4x1", "2:4")
_ALIASES = {"2of4": "2:4", "2-4": "2:4"}


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the `count` least scores (ties by position: exact counts)."""
    flat = scores.reshape(-1)
    if count <= 0:
        return np.zeros(0, np.int64)
    if count >= flat.size:
        return np.arange(flat.size)
    return np.argpartition(flat, count - 1, kind="introselect")[:count]


def prune(w: np.ndarray, sparsity: float, pattern: str = "unstructured") -> np.ndarray:
    """A copy of weight `w` [K, N] with the pattern's zeros (see the module docstring)."""
    pattern = _ALIASES.get(pattern, pattern)
    w = np.array(w, copy=True)
    if sparsity <= 0 or w.size == 0:
        return w
    K, N = w.shape
    if pattern == "unstructured":
        w.reshape(-1)[_smallest(np.abs(w), round(sparsity * w.size))] = 0
        return w
    kb = -(-K // 4)
    pad = np.zeros((kb * 4, N), np.float64)
    pad[:K] = w
    groups = pad.reshape(kb, 4, N)
    if pattern == "block4x1":
        norms = np.sqrt(np.sum(groups * groups, axis=1))   # [kb, N]
        gone = np.zeros(kb * N, bool)
        gone[_smallest(norms, round(sparsity * kb * N))] = True
        mask = np.repeat(gone.reshape(kb, 1, N), 4, axis=1).reshape(kb * 4, N)[:K]
        w[mask] = 0
        return w
    # 2:4: the two least |w| of each group of 4 (padding rows count as least)
    past = (np.arange(kb * 4) >= K).reshape(kb, 4, 1)
    mag = np.where(past, -1.0, np.abs(groups))
    order = np.argsort(mag, axis=1, kind="stable")
    drop = np.zeros_like(mag, bool)
    np.put_along_axis(drop, order[:, :2], True, axis=1)
    mask = drop.reshape(kb * 4, N)[:K]
    w[mask] = 0
    extra = round(sparsity * w.size) - int(mask.sum())
    if extra > 0:   # above 0.5: the smallest survivors, matrix-wide
        alive = np.flatnonzero(~mask.reshape(-1))
        w.reshape(-1)[alive[_smallest(np.abs(w.reshape(-1)[alive]), extra)]] = 0
    return w


def _head_weights(g: Graph) -> set[str]:
    """Names of the constants the logits head reads as its B (found on a copy without
    regions: after O2 the head may sit inside a `fused` node)."""
    flat = inline_regions(copy_graph(g)) if any(n.op == "fused" for n in g.nodes) else g
    return {n.inputs[1].name for n in heads(flat) if n.inputs[1].is_constant}


@graph_pass("sparsify-weights")
def sparsify_weights(g: Graph, sparsity: float = 0.5, pattern: str = "unstructured",
                     head: bool = False) -> Graph:
    """Magnitude pruning of matmul weights, per matrix (see the module docstring)."""
    pattern = _ALIASES.get(pattern, pattern)
    if pattern not in PATTERNS:
        raise TensorcError(f"sparsify-weights: unknown pattern {pattern!r} (known: "
                           f"unstructured, block4x1, 2:4 written 2of4)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        raise TensorcError(f"sparsify-weights: sparsity={sparsity!r} should be a number in "
                           f"[0, 1)")
    if pattern == "2:4" and 0 < sparsity < 0.5:
        raise TensorcError(f"sparsify-weights: pattern 2:4 zeros at least half, so "
                           f"sparsity={sparsity!r} should be 0 or in [0.5, 1)")
    if head not in (True, False, 0, 1):
        raise TensorcError(f"sparsify-weights: head={head!r} should be 0 or 1")
    if sparsity == 0:
        return g
    skip = set() if head else _head_weights(g)
    users, outputs = g.users(), set(g.outputs)
    for name, c in g.constants.items():
        readers = users.get(c, [])
        if c.type.dtype != "f32" or c.data is None or c.type.rank != 2 or c in outputs \
                or name in skip or not readers \
                or not all(_weight_uses(n, c) for n in readers):
            continue
        c.data = prune(np.asarray(c.data), float(sparsity), pattern).astype(np.float32)
    return g


def density(w: np.ndarray) -> float:
    """The share of nonzeros of a weight (for reports)."""
    w = np.asarray(w)
    return float(np.count_nonzero(w)) / max(1, w.size)
