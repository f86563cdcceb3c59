"""The IR's text form, printing half (`text.py` parses it back): below the IR, it reads
graphs, nodes and values only through the objects it is given."""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

import numpy as np

from .ops import get_op

if TYPE_CHECKING:
    from .ir import Graph, Node, Value

INLINE_MAX = 16


def _fmt_scalar(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return repr(x) if math.isfinite(x) else {math.inf: "inf", -math.inf: "-inf"}.get(x, "nan")
    if isinstance(x, str):
        return x if re.fullmatch(r"[A-Za-z_][\w.]*(\*[\w.]+)*|\d+(\*[\w.]+)+", x) \
            else json.dumps(x)
    return str(int(x))


def _fmt_attr(value, kind: str) -> str:
    if kind == "graph":  # a nested body, printed as a graph; its lines indent with the node
        return format_graph(value).rstrip("\n")
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_fmt_scalar(v) for v in value) + "]"
    if kind == "str":
        return json.dumps(value)
    return _fmt_scalar(value)


def format_node(node: Node) -> str:
    opdef = get_op(node.op)
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = [f"%{v.name}" for v in node.inputs]
    for k, spec in opdef.attrs.items():
        v = node.attrs.get(k, spec.default)
        if v != spec.default:
            args.append(f"{k}={_fmt_attr(v, spec.kind)}")
    return f"{outs} = {node.op}({', '.join(args)})"


def format_constant(v: Value) -> str:
    text = f"%{v.name}: {v.type} = const"
    if v.data is not None and v.data.size <= INLINE_MAX:
        flat = [_fmt_scalar(x) for x in v.data.reshape(-1).tolist()]
        text += " " + (flat[0] if v.type.rank == 0 else "[" + ",".join(flat) + "]")
    return text


def format_graph(g: Graph) -> str:
    params = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"graph {g.name}({params}) {{"]
    lines += ["  " + format_constant(v) for v in g.constants.values()]
    lines += ["  " + line for n in g.nodes for line in format_node(n).split("\n")]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
