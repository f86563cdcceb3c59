"""Attention: the target's flash-attention kernel as a library call (and its sparse and
linear attention kernels, where it has them)."""

from __future__ import annotations

from ..program import Call, NotLowerable


def _kernel_call(what: str, floats: int, needs: str | None = None):
    """The rule of an attention op the target runs as one library call: float32 only
    (its first `floats` inputs), and only where the target has the kernel (`needs`, a
    `Target` field); otherwise NotLowerable, and the op's decomposition runs."""
    def rule(lw, node, ins, attrs):
        if needs is not None and not getattr(lw.target, needs):
            raise NotLowerable(f"the target has no {what} kernel")
        if any(x.dtype != "f32" for x in ins[:floats]):
            raise NotLowerable(f"{what} is float32 only")
        out = lw.out_view(node.outputs[0].type.concrete(lw.env))
        lw.steps.append(Call(node.op, attrs, [lw.view(x) for x in ins], [out],
                             where=node.where))
        return [lw.of_view(out)]
    return rule


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


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "attention": _kernel_call("flash attention", 3),
    "attention_grad": _attention_grad,
    # llvm: llvm/sparse_attention.py, llvm/linear_attention.py; cupy: attention_kernels.py
    "local_attention": _kernel_call("sparse attention", 3, "sparse_attention"),
    "block_sparse_attention": _kernel_call("sparse attention", 3, "sparse_attention"),
    "linear_attention": _kernel_call("linear attention", 4, "linear_attention"),
}
