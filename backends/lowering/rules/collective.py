"""Collectives: one library call each, on contiguous views, which the runtime runs on the
running rank's communicator (through the op's reference: `ops.collective.group`)."""

from __future__ import annotations

from tensorc.ops.collective import COLLECTIVES

from ..program import Call


def _collective(lw, node, ins, attrs):
    outs = [lw.out_view(v.type.concrete(lw.env)) for v in node.outputs]
    lw.steps.append(Call(node.op, attrs, [lw.view(x) for x in ins], outs,
                         where=node.where))
    return [lw.of_view(o) for o in outs]


RULES = {op: _collective for op in COLLECTIVES}  # op name -> rule
