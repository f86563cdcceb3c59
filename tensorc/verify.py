"""The verifier: the invariants every graph keeps between passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ShapeError, VerifyError
from .types import TensorType

if TYPE_CHECKING:
    from .ir import Graph
from .ops import get_op


def verify(g: Graph) -> None:
    """Raise `VerifyError` unless the graph is well formed: every value defined once
    and before its use (SSA, topological order), every op known with valid attributes,
    declared types equal to inferred ones, constants' data matching their types."""
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, what: str):
        if v.name in names:
            raise VerifyError(f"%{v.name} is defined twice ({what})")
        names.add(v.name)
        defined.add(id(v))

    for v in g.inputs:
        define(v, "input")
    for name, v in g.constants.items():
        if name != v.name:
            raise VerifyError(f"constant %{v.name} is filed under the name {name!r}")
        if v.data is not None and TensorType.of(v.data) != v.type:
            raise VerifyError(f"constant %{v.name} is declared {v.type} but its data is "
                              f"{TensorType.of(v.data)}")
        define(v, "constant")
    for node in g.nodes:
        for v in node.inputs:
            if id(v) not in defined:
                raise VerifyError(f"{node.where}: input %{v.name} is used before it is defined")
        opdef = get_op(node.op)
        try:
            if opdef.complete_attrs(node.attrs) != node.attrs:
                raise VerifyError(f"{node.where}: attributes are not in canonical form")
            types = opdef.infer_node(node)
        except ShapeError as e:
            raise VerifyError(str(e)) from None
        if len(types) != len(node.outputs):
            raise VerifyError(f"{node.where}: has {len(node.outputs)} outputs, op gives "
                              f"{len(types)}")
        for v, t in zip(node.outputs, types, strict=True):
            if v.type != t:
                raise VerifyError(f"{node.where}: %{v.name} is declared {v.type} but infers {t}")
            if v.producer is not node:
                raise VerifyError(f"{node.where}: %{v.name} does not point back to its node")
            define(v, node.op)
    if not g.outputs:
        raise VerifyError(f"graph {g.name} has no outputs")
    for v in g.outputs:
        if id(v) not in defined:
            raise VerifyError(f"output %{v.name} is not defined in the graph")
