"""The text form: print -> parse -> print is the identity on random graphs, and
malformed text gives a ParseError that points at a line."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorc
from tensorc.errors import ParseError, ShapeError
from tensorc.ir import DTYPES, Graph, TensorType
from tensorc.ops.shape import SLICE_END
from tensorc.text import INLINE_MAX, format_graph, parse_graph

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,7}", fullmatch=True)
DIMS = st.sampled_from([1, 2, 3, 5, "batch", "seq"])
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -3.0e38, 0.1, -7.5]
INT_RANGE = {"i8": (-128, 127), "i32": (-2**31, 2**31 - 1), "i64": (-2**63, 2**63 - 1),
             "u8": (0, 255)}
FLOAT_WIDTH = {"f16": 16, "bf16": 32, "f32": 32, "f64": 64}   # bf16: float32s, rounded


def scalars(dtype):
    if dtype == "bool":
        return st.booleans()
    if dtype in INT_RANGE:
        return st.integers(*INT_RANGE[dtype])
    biggest = float(np.finfo(DTYPES[dtype]).max)
    fits = [v for v in SPECIAL if not abs(v) < math.inf or abs(v) <= biggest]
    return st.one_of(st.sampled_from(fits), st.floats(width=FLOAT_WIDTH[dtype], allow_nan=False))


@st.composite
def random_graphs(draw):
    """A verified random graph: inputs with symbolic dims, small inline constants of
    every dtype (inf, -inf, nan, -0.0 included), and a chain of random nodes."""
    g = Graph(draw(st.from_regex(r"[A-Za-z_]\w{0,8}", fullmatch=True)))

    def name():
        """A drawn name, or None for an automatic one."""
        if draw(st.booleans()):
            return None
        return draw(NAMES.filter(lambda s: s not in g._names))

    def fresh():
        return name() or g.fresh_name()

    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(DIMS, max_size=3)))
        g.add_input(fresh(), TensorType(shape, draw(st.sampled_from(["f32", "f32", "i64"]))))
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
        n = math.prod(shape)
        data = np.array(draw(st.lists(scalars(dtype), min_size=n, max_size=n)),
                        DTYPES[dtype]).reshape(shape)
        g.add_constant(fresh(), data)
    if draw(st.booleans()):  # a large constant travels without inline data
        g.add_constant(fresh(), None, TensorType((INLINE_MAX + 1, 2), "f32"))

    def pool(dtype="f32", min_rank=0):
        vals = [v for v in g.values().values() if v.type.dtype == dtype
                and v.type.rank >= min_rank]
        return draw(st.sampled_from(vals)) if vals else None

    def add(op, inputs, **attrs):
        names = None
        if op != "split" and draw(st.booleans()):
            names = [fresh()]
        try:
            return g.add_node(op, inputs, attrs, names=names)
        except ShapeError:
            return None

    for _ in range(draw(st.integers(1, 10))):
        a = pool()
        if a is None:
            a = g.add_constant(fresh(), np.float32(draw(scalars("f32"))))
        shape, rank = a.type.shape, a.type.rank
        kind = draw(st.sampled_from(["unary", "binary", "where", "reduce", "reshape",
                                     "transpose", "slice", "concat", "matmul", "split",
                                     "cast", "full", "clip", "softmax"]))
        if kind == "unary":
            op = draw(st.sampled_from(["neg", "exp", "tanh", "relu", "erf", "abs", "gelu"]))
            attrs = {"approximate": draw(st.sampled_from(["none", "tanh"]))} \
                if op == "gelu" else {}
            add(op, [a], **attrs)
        elif kind == "binary":
            b = pool()
            op = draw(st.sampled_from(["add", "sub", "mul", "div", "maximum", "pow"]))
            add(op, [a, b]) or add(op, [a, a])
        elif kind == "where":
            b = pool()
            cond = add("greater", [a, b]) or add("less", [a, a])
            add("where", [cond[0], a, a])
        elif kind == "reduce":
            op = draw(st.sampled_from(["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"]))
            axes = draw(st.none() | st.lists(st.integers(-rank, rank - 1), min_size=1,
                                             max_size=rank, unique=True)) if rank else None
            add(op, [a], axes=axes, keepdims=draw(st.booleans()))
        elif kind == "reshape":
            targets = [(-1,), shape + (1,), (1,) + shape]
            targets += [shape[:i] + (-1,) + shape[i + 1:] for i in range(rank)]
            add("reshape", [a], shape=draw(st.sampled_from(targets)))
        elif kind == "transpose":
            perm = draw(st.none() | st.permutations(range(rank)))
            add("transpose", [a], perm=None if perm is None else tuple(perm))
        elif kind == "slice" and rank:
            axis = draw(st.integers(-rank, rank - 1))
            d = shape[axis]
            if isinstance(d, int):
                start = draw(st.integers(-d, d))
                end = draw(st.integers(-d, d) | st.just(SLICE_END))
                step = draw(st.integers(1, 3))
            else:
                start = draw(st.integers(0, 2))
                end, step = draw(st.sampled_from([SLICE_END, start + 1])), 1
                start = 0 if end == SLICE_END else start
            add("slice", [a], starts=(start,), ends=(end,), axes=(axis,),
                steps=None if step == 1 else (step,))
        elif kind == "concat" and rank:
            axes = [i for i, d in enumerate(shape) if isinstance(d, int)]
            if axes:
                add("concat", [a] * draw(st.integers(1, 3)), axis=draw(st.sampled_from(axes)))
        elif kind == "matmul" and rank:
            k = shape[-1]
            if isinstance(k, int):
                n = draw(st.integers(1, 3))
                w = g.add_constant(fresh(), np.arange(k * n, dtype=np.float32).reshape(k, n))
                add("matmul", [a, w])
            elif rank >= 2:
                perm = list(range(rank))
                perm[-1], perm[-2] = perm[-2], perm[-1]
                (t,) = add("transpose", [a], perm=tuple(perm))
                add("matmul", [a, t])
        elif kind == "split" and rank:
            axes = [i for i, d in enumerate(shape) if isinstance(d, int)]
            if axes:
                axis = draw(st.sampled_from(axes))
                cuts = sorted(draw(st.lists(st.integers(0, shape[axis]), max_size=2)))
                bounds = [0, *cuts, shape[axis]]
                sizes = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
                names = [fresh() for _ in sizes]
                if len(set(names)) == len(names):
                    g.add_node("split", [a], {"axis": axis, "sizes": sizes}, names=names)
        elif kind == "cast":
            add("cast", [a], dtype=draw(st.sampled_from(sorted(DTYPES))))
        elif kind == "full":
            dtype = draw(st.sampled_from(["f32", "i64", "bool"]))
            add("full", [], shape=tuple(draw(st.lists(DIMS, max_size=3))),
                value=draw(scalars(dtype)), dtype=dtype)
        elif kind == "clip":
            bound = st.none() | st.sampled_from([-math.inf, -1.0, 0.0, 2.5, math.inf])
            add("clip", [a], min=draw(bound), max=draw(bound))
        elif kind == "softmax" and rank:
            axis = draw(st.integers(-rank, rank - 1))
            add(draw(st.sampled_from(["softmax", "log_softmax", "layer_norm"])), [a], axis=axis)

    produced = [v for n in g.nodes for v in n.outputs] or g.inputs
    g.outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3))
    return g.verify()


def same_data(a, b):
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or a.dtype == DTYPES["bf16"]:  # -0.0 keeps its sign; nan stays nan
        nan = np.isnan(a)
        return np.array_equal(nan, np.isnan(b)) and \
            a[~nan].tobytes() == b[~nan].tobytes()
    return np.array_equal(a, b)


@SETTINGS
@given(random_graphs())
def test_print_parse_print_is_identity(g):
    text = format_graph(g)
    parsed = parse_graph(text)
    assert format_graph(parsed) == text
    parsed.verify()
    assert [n.op for n in parsed.nodes] == [n.op for n in g.nodes]
    assert [v.name for v in parsed.outputs] == [v.name for v in g.outputs]
    for name, v in g.constants.items():
        inline = v.data is not None and v.data.size <= INLINE_MAX
        assert same_data(parsed.constants[name].data, v.data if inline else None), name


@SETTINGS
@given(random_graphs(), st.data())
def test_malformed_text_gives_a_parse_error_with_a_line(g, data):
    """Cut, drop or insert characters anywhere: the parser either reads a graph or
    says which line is wrong; it never fails with another exception."""
    text = format_graph(g)
    i = data.draw(st.integers(0, len(text) - 1))
    j = data.draw(st.integers(i, min(len(text), i + 6)))
    junk = data.draw(st.sampled_from(["", "%", "(", ")", "[", "]", ",", "=", ":", "}", "@",
                                      "x", "-", "1", "f99", "%zz", "\n"]))
    bad = text[:i] + junk + text[j:]
    try:
        parse_graph(bad)
    except ParseError as e:
        msg = str(e)
        assert "\n" not in msg
        assert re.match(r"line \d+: ", msg), msg
        line = int(msg.split()[1].rstrip(":"))
        assert 1 <= line <= bad.count("\n") + 1


GOOD = """\
graph g(%x: f32[batch,3]) {
  %w: f32[3,2] = const [1.0,2.0,3.0,4.0,5.0,-0.0]
  %h: f32[batch,2] = matmul(%x, %w)
  %y: f32[batch,2] = gelu(%h, approximate="tanh")
  return %y
}
"""


def test_good_text_parses_and_runs():
    g = parse_graph(GOOD)
    assert format_graph(g) == GOOD
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.array([[1, 2], [3, 4], [5, -0.0]], np.float32)
    h = (x @ w).astype(np.float64)
    want = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    np.testing.assert_allclose(tensorc.compile(g)(x), want, rtol=1e-6)


def _replace(line_no, new):
    lines = GOOD.splitlines()
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line, words", [
    (_replace(3, "  %h: f32[batch,2] = frobnicate(%x, %w)"), 3, ["frobnicate"]),
    (_replace(3, "  %h: f32[batch,2] = matmul(%x, %v)"), 3, ["%v", "before it is defined"]),
    (_replace(3, "  %h: f32[batch,7] = matmul(%x, %w)"), 3, ["f32[batch,7]", "f32[batch,2]"]),
    (_replace(3, "  %h: f32[batch,2] = matmul(%x, %w) $"), 3, ["'$'"]),
    (_replace(3, "  %w: f32[batch,2] = matmul(%x, %w)"), 3, ["%w is defined twice"]),
    (_replace(4, "  %y: f32[batch,2] = gelu(%h, approx=\"tanh\")"), 4, ["approx"]),
    (_replace(4, "  %y: f32[batch,2] = gelu(%h, approximate=\"cubic\")"), 4, ["cubic"]),
    (_replace(3, "  %h: f99[batch,2] = matmul(%x, %w)"), 3, ["f99"]),
    (_replace(3, "  %h: f32[batch,-2] = matmul(%x, %w)"), 3, ["-2"]),
    (_replace(2, "  %w: f32[3,2] = const [1.0,2.0,3.0]"), 2, ["%w", "f32[3,2]"]),
    (_replace(2, "  %w: f32[3,2] = const [1.0,2.0,3.0,4.0,5.0,oops]"), 2, ["%w"]),
    (_replace(2, "  %w: f32[batch,2] = const [1.0,2.0]"), 2, ["%w"]),
    (_replace(2, "  %w: f32[3,2], %v: f32[1] = const"), 2, ["const"]),
    (_replace(3, "  %h: f32[batch,2], %k: f32[1] = matmul(%x, %w)"), 3, ["matmul"]),
    (_replace(5, "  return %y, %nope"), 5, ["%nope"]),
    (GOOD.replace("}\n", ""), 5, ["end of text"]),
    (GOOD + "extra\n", 7, ["after the graph"]),
    ("", 1, ["end of text"]),
])
def test_parse_errors_name_the_line(text, line, words):
    with pytest.raises(ParseError) as info:
        parse_graph(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"line {line}: "), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_traced_model_round_trips():
    model = tensorc.models.get("bert", "tiny")
    g = tensorc.trace(model, **model.example_inputs(2, 8))
    text = format_graph(g)
    assert format_graph(parse_graph(text)) == text
