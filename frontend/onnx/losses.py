"""ONNX's loss ops as compositions of IR ops: NegativeLogLikelihoodLoss and
SoftmaxCrossEntropyLoss (which is log_softmax then the same loss).

For input `[N, C, d1, ...]` and target `[N, d1, ...]`, the class axis is read through
a one-hot mask, `equal(unsqueeze(target, 1), range(C))`: `picked = reduce_sum(
where(mask, input, 0), axis 1)` is `input[n, target[n, d], d]` without a gather per
element, and a target outside `[0, C)` (an ignore_index such as -100) picks nothing.
The per-element weight is `weight[target]` the same way (1 without weights), zeroed
where target == ignore_index; the loss is `-picked * w`, summed, or its weighted mean
`sum(loss) / sum(w)` (ONNX's definition: the mean over the non-ignored elements,
weighted). Everything is elementwise or a reduction, so it runs on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from tensorc.errors import ShapeError

from .handlers import _scalar, _shape
from .values import Entry, _dtype

if TYPE_CHECKING:
    from .importer import OnnxNode, _Importer

REDUCTIONS = ("none", "sum", "mean")


def _nll(cx: _Importer, n: OnnxNode, logp: Entry) -> Entry:
    """The negative log-likelihood of `logp` [N, C, d...] at node n's target (input 1)
    and weight (input 2), reduced as the node says."""
    target = n.x(1)
    shape, tshape = _shape(logp), _shape(target)
    dt = _dtype(logp)
    reduction = n.attr("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise ShapeError(f"{n.where}: reduction {reduction!r} is not one of {REDUCTIONS}")
    if len(shape) < 2 or list(tshape) != [shape[0], *shape[2:]]:
        raise ShapeError(f"{n.where}: target shape {list(tshape)} does not match input "
                         f"shape {list(shape)} ([N, C, d1, ...] and [N, d1, ...])")
    classes = shape[1]
    if not isinstance(classes, int):
        raise n.unsupported(f"the class count {classes!r} must be static")
    if _dtype(target) not in ("i32", "i64", "i8", "u8"):
        raise ShapeError(f"{n.where}: target has dtype {_dtype(target)}; ONNX needs integers")
    target = cx.op("cast", target, dtype="i64") if _dtype(target) != "i64" else target
    rank = len(shape)
    hot = cx.op("equal", cx.op("unsqueeze", target, axes=[1]), np.arange(
        classes, dtype=np.int64).reshape([classes] + [1] * (rank - 2)))
    zero = _scalar(0, dt)
    picked = cx.op("reduce_sum", cx.op("where", hot, logp, zero), axes=[1], keepdims=False)
    ignore = n.attr("ignore_index")
    keep = None if ignore is None else cx.op(
        "logical_not", cx.op("equal", target, _scalar(ignore, "i64")))
    if n.has(2):
        weight = n.x(2)
        if list(_shape(weight)) != [classes]:
            raise ShapeError(f"{n.where}: weight has shape {list(_shape(weight))}; it "
                             f"should be [C] = [{classes}]")
        w = cx.op("reduce_sum", cx.op("where", hot, cx.op(
            "reshape", weight, shape=[classes] + [1] * (rank - 2)), zero), axes=[1],
            keepdims=False)
        w = w if keep is None else cx.op("where", keep, w, zero)
    else:
        w = None if keep is None else cx.op("cast", keep, dtype=dt)
    loss = cx.op("neg", picked if w is None else cx.op("mul", picked, w))
    axes = list(range(len(tshape)))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return cx.op("reduce_sum", loss, axes=axes, keepdims=False)
    if w is None:
        return cx.op("reduce_mean", loss, axes=axes, keepdims=False)
    return cx.op("div", cx.op("reduce_sum", loss, axes=axes, keepdims=False),
                 cx.op("reduce_sum", w, axes=axes, keepdims=False))


def _negative_log_likelihood_loss(cx, n):
    return [_nll(cx, n, n.x(0))]


def _softmax_cross_entropy_loss(cx, n):
    """SoftmaxCrossEntropyLoss: log_softmax over the class axis (1), then the NLL; the
    optional second output is that log_softmax."""
    logp = cx.op("log_softmax", n.x(0), axis=1)
    return [_nll(cx, n, logp), logp]


HANDLERS: dict[str, Callable[[_Importer, OnnxNode], list[Entry]]] = {
    "NegativeLogLikelihoodLoss": _negative_log_likelihood_loss,
    "SoftmaxCrossEntropyLoss": _softmax_cross_entropy_loss,
}
