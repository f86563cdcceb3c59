"""Attention: the target's flash-attention kernel as a library call (and its sparse and
linear attention kernels, where it has them)."""

from __future__ import annotations

from ..program import Call, NotLowerable


def _attention(lw, node, ins, attrs):
    if any(x.dtype != "f32" for x in ins[:3]):
        raise NotLowerable("flash attention is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call("attention", attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


def _sparse_attention(lw, node, ins, attrs):
    """`local_attention` / `block_sparse_attention`: the target's sparse kernel (llvm:
    `llvm/sparse_attention.py`) for float32; elsewhere the op's decomposition."""
    if not lw.target.sparse_attention:
        raise NotLowerable("the target has no sparse attention kernel")
    if any(x.dtype != "f32" for x in ins[:3]):
        raise NotLowerable("sparse attention is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call(node.op, attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


def _attention_grad(lw, node, ins, attrs):
    """The target's fused backward (llvm: `llvm/attention_grad.py`), for f32 (a bool or
    f32 mask included); otherwise, and on targets without one, the op's decomposition
    runs."""
    if not lw.target.grad_kernels:
        raise NotLowerable("the target has no fused attention backward")
    if any(x.dtype != "f32" for x in ins[:3] + ins[-1:]):
        raise NotLowerable("the fused attention backward is float32 only")
    outs = [lw.out_view(v.type.concrete(lw.env)) for v in node.outputs]
    lw.steps.append(Call("attention_grad", attrs, [lw.view(x) for x in ins], outs,
                         where=node.where))
    return [lw.of_view(o) for o in outs]


def _sparse_attention(lw, node, ins, attrs):
    if not lw.target.sparse_attention:
        raise NotLowerable("the target has no sparse attention kernel")
    if any(x.dtype != "f32" for x in ins[:3]):
        raise NotLowerable("the sparse attention kernel is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call(node.op, attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


def _linear_attention(lw, node, ins, attrs):
    """The target's Performer kernel (llvm: `llvm/linear_attention.py`), float32 only;
    otherwise the op's decomposition runs."""
    if not lw.target.linear_attention:
        raise NotLowerable("the target has no linear attention kernel")
    if any(x.dtype != "f32" for x in ins[:4]):
        raise NotLowerable("linear attention is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call("linear_attention", attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "attention": _attention,
    "attention_grad": _attention_grad,
    "local_attention": _sparse_attention,
    "block_sparse_attention": _sparse_attention,
    "linear_attention": _linear_attention,
}
