"""Attention: the target's flash-attention kernel as a library call."""

from __future__ import annotations

from ..program import Call, NotLowerable


def _attention(lw, node, ins, attrs):
    if any(x.dtype != "f32" for x in ins[:3]):
        raise NotLowerable("flash attention is float32 only")
    out = lw.out_view(node.outputs[0].type.concrete(lw.env))
    lw.steps.append(Call("attention", attrs, [lw.view(x) for x in ins], [out],
                         where=node.where))
    return [lw.of_view(out)]


RULES = {  # op name -> rule(lowering, node, inputs, attrs) -> outputs
    "attention": _attention,
}
