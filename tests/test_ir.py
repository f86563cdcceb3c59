"""The IR: symbolic dims, the verifier, input binding, and the networkx view."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

import tensorc
from tensorc.errors import InputError, ShapeError, TensorcError, VerifyError
from tensorc.ir import Graph, TensorType, Value, dim_divide, dim_product, resolve_dim

# --- symbolic dims -------------------------------------------------------------------


@pytest.mark.parametrize("dims, product", [
    ([2, "seq", 4], "8*seq"),
    (["seq", "batch"], "batch*seq"),
    (["batch", 1, "batch"], "batch*batch"),
    ([3, 5], 15),
    ([], 1),
    (["batch", 0], 0),
    (["2*batch", "3*seq"], "6*batch*seq"),
])
def test_dim_product(dims, product):
    assert dim_product(dims) == product


@pytest.mark.parametrize("a, b, quotient", [
    ("8*seq", 4, "2*seq"),
    ("batch*seq", "batch", "seq"),
    ("8*batch*seq", "2*seq", "4*batch"),
    (12, 4, 3),
    ("batch", "batch", 1),
    ("8*seq", 3, None),        # not exact
    ("seq", "batch", None),    # a symbol the dividend lacks
    (12, 0, None),
    (6, "seq", None),
])
def test_dim_divide(a, b, quotient):
    assert dim_divide(a, b) == quotient


def test_resolve_dim():
    env = {"batch": 3, "seq": 5}
    assert resolve_dim("8*batch*seq", env) == 120
    assert resolve_dim("batch*batch", env) == 9
    assert resolve_dim(7, {}) == 7
    with pytest.raises(ShapeError, match="'heads' is not bound"):
        resolve_dim("2*heads", env)


def test_tensor_type_canonicalises_and_rejects_bad_dims():
    assert TensorType(("seq*batch", "4*seq*batch")).shape == ("batch*seq", "4*batch*seq")
    assert str(TensorType(("batch", 3), "i64")) == "i64[batch,3]"
    for bad in (-1, "3x", True, "a b"):
        with pytest.raises(TensorcError, match="bad dimension"):
            TensorType((bad,))
    with pytest.raises(TensorcError, match="unsupported dtype"):
        TensorType((3,), "complex64")


def _reshaped(shape, target):
    g = Graph()
    return g.add("reshape", g.add_input("x", TensorType(shape)), shape=target).type.shape


@pytest.mark.parametrize("shape, target, out", [
    (("batch", "seq", 64), ("batch", "seq", 4, -1), ("batch", "seq", 4, 16)),
    (("batch", "seq", 64), (-1, 64), ("batch*seq", 64)),
    (("batch*seq", 64), ("batch", -1, 64), ("batch", "seq", 64)),
    (("batch", "seq", 8), ("batch", -1), ("batch", "8*seq")),
    (("batch", 6), (-1, 2, 3), ("batch", 2, 3)),
])
def test_reshape_minus_one_with_symbolic_dims(shape, target, out):
    assert _reshaped(shape, target) == out


def test_reshape_minus_one_that_does_not_divide():
    with pytest.raises(ShapeError, match=r"cannot reshape f32\[batch,6\] to \[seq,-1\]"):
        _reshaped(("batch", 6), ("seq", -1))
    with pytest.raises(ShapeError, match=r"cannot reshape f32\[batch,7\] to \[-1,2\]"):
        _reshaped(("batch", 7), (-1, 2))


def _embed_and_flatten(ids):
    """A function on symbolic [batch, seq] ids: embed, scale, flatten, reduce."""
    from tensorc.frontend import F
    table = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    h = F.embedding(ids, table) * 2.0                 # [batch, seq, 4]
    flat = h.reshape(-1, 4)                           # [batch*seq, 4]
    return flat.sum(axis=-1).reshape(ids.shape[0], -1)  # [batch, seq]


def _embed_and_flatten_numpy(ids):
    table = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    return (table[ids] * np.float32(2.0)).sum(-1)


def test_symbolic_graph_runs_at_several_sizes():
    g = tensorc.trace(_embed_and_flatten, tensorc.TensorSpec(("batch", "seq"), "i64"))
    assert g.inputs[0].type.shape == ("batch", "seq")
    assert g.outputs[0].type.shape == ("batch", "seq")
    exe = tensorc.compile(g, "numpy", "O0")
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (2, 5), (3, 17)]:
        ids = rng.integers(0, 10, (batch, seq))
        np.testing.assert_allclose(exe(ids), _embed_and_flatten_numpy(ids), rtol=1e-6)


def test_inconsistent_symbol_bindings_name_the_input_and_both_shapes():
    g = Graph("two")
    x = g.add_input("x", TensorType(("batch", 4)))
    y = g.add_input("y", TensorType(("batch", 4)))
    g.outputs = [g.add("add", x, y)]
    exe = tensorc.compile(g, "numpy", "O0")
    a = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(exe(a, a), a + a)
    with pytest.raises(InputError) as info:
        exe(a, np.ones((3, 4), np.float32))
    msg = str(info.value)
    assert "\n" not in msg
    assert "'y'" in msg and "[3, 4]" in msg and "f32[batch,4]" in msg, msg
    assert "batch=2" in msg and "'x' [2, 4]" in msg, msg


@pytest.mark.parametrize("bad, what", [
    (np.ones((2, 5), np.float32), "[2, 5]"),       # static dim differs
    (np.ones((2, 4), np.int64), "i64"),            # dtype differs
    (np.ones((2, 4, 1), np.float32), "[2, 4, 1]"),  # rank differs
])
def test_input_of_the_wrong_type(bad, what):
    g = Graph("one")
    x = g.add_input("x", TensorType(("batch", 4)))
    g.outputs = [g.add("neg", x)]
    with pytest.raises(InputError, match="input 'x'") as info:
        tensorc.compile(g)(bad)
    assert what in str(info.value)


def test_missing_and_unknown_inputs():
    g = Graph("one")
    g.outputs = [g.add("neg", g.add_input("x", TensorType((2,))))]
    exe = tensorc.compile(g)
    with pytest.raises(InputError, match=r"missing \['x'\]; unknown \['z'\]"):
        exe(z=np.ones(2, np.float32))


# --- the verifier --------------------------------------------------------------------

def small_graph():
    """x -> matmul w -> add b -> tanh; returns the graph."""
    g = Graph("small")
    x = g.add_input("x", TensorType(("batch", 3)))
    w = g.add_constant("w", np.ones((3, 2), np.float32))
    b = g.add_constant("b", np.zeros((2,), np.float32))
    h = g.add("matmul", x, w)
    h = g.add("add", h, b)
    g.outputs = [g.add("tanh", h)]
    return g.verify()


def test_verifier_accepts_a_good_graph():
    g = small_graph()
    assert [n.op for n in g.nodes] == ["matmul", "add", "tanh"]


def test_verifier_use_before_def():
    g = small_graph()
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]
    with pytest.raises(VerifyError, match="used before it is defined"):
        g.verify()


def test_verifier_value_not_in_graph():
    g = small_graph()
    g.nodes[0].inputs[1] = Value("stray", TensorType((3, 2)))
    with pytest.raises(VerifyError, match="%stray is used before it is defined"):
        g.verify()


def test_verifier_duplicate_names():
    g = small_graph()
    g.nodes[1].outputs[0].name = "x"
    with pytest.raises(VerifyError, match="%x is defined twice"):
        g.verify()


def test_verifier_declared_type_differs_from_inferred():
    g = small_graph()
    v = g.nodes[0].outputs[0]
    v.type = TensorType(("batch", 5))
    with pytest.raises(VerifyError, match=r"declared f32\[batch,5\] but infers f32\[batch,2\]"):
        g.verify()


def test_verifier_constant_data_does_not_match_its_type():
    g = small_graph()
    g.constants["w"].data = np.ones((3, 2), np.float64)
    with pytest.raises(VerifyError, match=r"%w is declared f32\[3,2\] but its data is f64\[3,2\]"):
        g.verify()
    g.constants["w"].data = np.ones((2, 3), np.float32)
    with pytest.raises(VerifyError, match=r"data is f32\[2,3\]"):
        g.verify()


def test_verifier_missing_outputs():
    g = small_graph()
    g.outputs = []
    with pytest.raises(VerifyError, match="no outputs"):
        g.verify()
    g.outputs = [Value("ghost", TensorType((1,)))]
    with pytest.raises(VerifyError, match="output %ghost is not defined"):
        g.verify()


def test_verifier_bad_attributes_and_unknown_ops():
    g = small_graph()
    g.nodes[2].attrs["approximate"] = "tanh"
    with pytest.raises(VerifyError, match="unknown attribute"):
        g.verify()
    g = small_graph()
    g.nodes[2].op = "frobnicate"
    with pytest.raises(TensorcError, match="unknown op 'frobnicate'"):
        g.verify()


def test_verifier_wrong_input_count():
    g = small_graph()
    g.nodes[1].inputs.append(g.inputs[0])
    with pytest.raises(VerifyError, match="takes 2 inputs, got 3"):
        g.verify()


def test_graph_refuses_duplicate_names_while_building():
    g = Graph()
    g.add_input("x", TensorType((2,)))
    with pytest.raises(TensorcError, match="%x is defined twice"):
        g.add_constant("x", np.ones(2, np.float32))


# --- networkx view -------------------------------------------------------------------

def test_to_networkx_counts_and_order():
    g = Graph("nx")
    x = g.add_input("x", TensorType((2, 3)))
    w = g.add_constant("w", np.ones((3, 3), np.float32))
    h = g.add("matmul", x, w)
    sq = g.add("mul", h, h)                    # one edge, though h is used twice
    a, b = g.add_node("split", [sq], {"axis": 1, "sizes": (1, 2)})
    c = g.add("concat", b, a, x, axis=1)
    g.outputs = [c, g.add("tanh", c)]
    g.verify()
    dg = g.to_networkx()
    assert isinstance(dg, nx.DiGraph)
    assert dg.number_of_nodes() == len(g.inputs) + len(g.constants) + len(g.nodes) == 7
    sources = {}
    for v in g.inputs + list(g.constants.values()):
        sources[v] = v.name
    for i, n in enumerate(g.nodes):
        sources.update((v, i) for v in n.outputs)
    edges = {(sources[v], i) for i, n in enumerate(g.nodes) for v in n.inputs}
    assert set(dg.edges) == edges and dg.number_of_edges() == 7
    assert nx.is_directed_acyclic_graph(dg)
    op_nodes = [n for n in nx.topological_sort(dg) if isinstance(n, int)]
    assert sorted(op_nodes) == list(range(len(g.nodes)))
    for u, v in dg.edges:  # the graph's own order is a topological order
        if isinstance(u, int):
            assert u < v
    assert [dg.nodes[i]["op"] for i in range(len(g.nodes))] == [n.op for n in g.nodes]
    assert dg.nodes["x"]["kind"] == "input" and dg.nodes["w"]["kind"] == "constant"
    assert dg.edges[0, 1]["value"] == h.name


def test_to_networkx_on_a_traced_model():
    model = tensorc.models.get("gpt", "tiny")
    g = tensorc.trace(model, **model.example_inputs(1, 4))
    dg = g.to_networkx()
    order = list(nx.topological_sort(dg))
    assert dg.number_of_nodes() == len(g.inputs) + len(g.constants) + len(g.nodes)
    assert all(u < v for u, v in dg.edges if isinstance(u, int))
    assert len(order) == dg.number_of_nodes()

