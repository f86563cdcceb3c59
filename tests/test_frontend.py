"""The model DSL: Module/Parameter, deterministic init, weight files, tracing errors
and indexing."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import safetensors.numpy

import tensorc
from tensorc.errors import ShapeError, TensorcError, TraceError
from tensorc.frontend import F, Linear, Module, Parameter, Tensor, normal
from tensorc.frontend import weights as weight_files


class TiedNet(Module):
    """Embedding and output projection share one matrix."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = Parameter((vocab, dim), normal(1.0))
        self.hidden = Linear(dim, dim)
        self.blocks = [Linear(dim, dim, bias=False) for _ in range(2)]
        self.head_weight = self.emb  # tied: the same Parameter under a second name

    def forward(self, ids):
        x = F.embedding(ids, self.emb)
        x = F.tanh(self.hidden(x))
        for b in self.blocks:
            x = x + b(x)
        return x @ self.head_weight.T


def test_named_parameters_count_tied_weights_once():
    net = TiedNet().init_weights(0)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["emb", "hidden.weight", "hidden.bias", "blocks.0.weight", "blocks.1.weight"]
    assert net.num_parameters() == 11 * 6 + 6 * 6 + 6 + 2 * 6 * 6
    assert sorted(net.state_dict()) == sorted(names)
    assert net.head_weight is net.emb


def test_load_state_dict_checks_names_and_shapes():
    net = TiedNet().init_weights(0)
    state = net.state_dict()
    other = TiedNet().load_state_dict(state)
    np.testing.assert_array_equal(other.emb.numpy(), state["emb"])
    bad = dict(state, **{"hidden.weight": np.zeros((6, 7), np.float32)})
    with pytest.raises(TensorcError, match=r"'hidden.weight': expected shape \[6, 6\], "
                                           r"file has \[6, 7\]"):
        TiedNet().load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "emb"}
    with pytest.raises(TensorcError, match=r"missing \['emb'\]"):
        TiedNet().load_state_dict(missing)
    with pytest.raises(TensorcError, match=r"unknown \['extra'\]"):
        TiedNet().load_state_dict(dict(state, extra=np.zeros(1)))


def test_parameter_before_init_is_an_error():
    net = TiedNet()
    with pytest.raises(TensorcError, match="init_weights"):
        net(np.array([1, 2]))
    with pytest.raises(TraceError, match="init_weights"):
        tensorc.trace(net, np.array([[1, 2]]))


def test_init_is_deterministic_per_seed():
    a, b, c = TiedNet().init_weights(7), TiedNet().init_weights(7), TiedNet().init_weights(8)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                            c.named_parameters(), strict=True):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=name)
        assert not np.array_equal(pa.numpy(), pc.numpy()), name
        assert pa.numpy().dtype == np.float32 and np.any(pa.numpy() != 0)
    # each parameter draws from its own stream: blocks do not share values
    assert not np.array_equal(a.blocks[0].weight.numpy(), a.blocks[1].weight.numpy())


def test_zoo_init_is_deterministic():
    a = tensorc.models.get("gpt", "tiny", seed=3).state_dict()
    b = tensorc.models.get("gpt", "tiny", seed=3).state_dict()
    c = tensorc.models.get("gpt", "tiny", seed=4).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a)


# --- weight files --------------------------------------------------------------------

def _tensors():
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.standard_normal((3, 17)).astype(np.float32),
        "w.f16": rng.standard_normal((5,)).astype(np.float16),
        "w.f64": rng.standard_normal((2, 1, 3)),
        "ids": rng.integers(-2**40, 2**40, (4,)),
        "small": rng.integers(-100, 100, (1, 3)).astype(np.int8),
        "bytes": rng.integers(0, 255, (3,)).astype(np.uint8),
        "i32": rng.integers(-9, 9, (2, 2)).astype(np.int32),
        "mask": rng.random((2, 3)) < 0.5,
        "scalar": np.array(2.5, np.float32),
    }


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_weights_round_trip(tmp_path, ext):
    path = str(tmp_path / f"w{ext}")
    tensors = _tensors()
    weight_files.save(path, tensors)
    _assert_same(weight_files.load(path), tensors)


def test_our_safetensors_are_read_by_the_library_and_back(tmp_path):
    tensors = _tensors()
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    weight_files.save(ours, tensors)
    _assert_same(safetensors.numpy.load_file(ours), tensors)
    safetensors.numpy.save_file(tensors, theirs, metadata={"format": "np"})
    _assert_same(weight_files.load(theirs), tensors)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_module_save_and_load_weights(tmp_path, ext):
    path = str(tmp_path / f"model{ext}")
    a = tensorc.models.get("bert", "tiny", seed=1)
    a.save_weights(path)
    b = tensorc.models.get("bert", "tiny", seed=2).load_weights(path)
    inputs = a.example_inputs(2, 8)
    np.testing.assert_array_equal(a(**inputs).numpy(), b(**inputs).numpy())


def _corrupt_files(tmp_path):
    good = str(tmp_path / "good.safetensors")
    weight_files.save(good, _tensors())
    raw = open(good, "rb").read()
    npz = str(tmp_path / "good.npz")
    weight_files.save(npz, _tensors())
    raw_npz = open(npz, "rb").read()
    rng = np.random.default_rng(0)
    header_list = b"[1, 2]"
    cases = {
        "truncated.safetensors": raw[:-10],
        "header-only.safetensors": raw[:20],
        "empty.safetensors": b"",
        "garbage.safetensors": rng.integers(0, 256, 200, dtype=np.uint8).tobytes(),
        "huge-header.safetensors": (2**40).to_bytes(8, "little") + b"{}",
        "list-header.safetensors": len(header_list).to_bytes(8, "little") + header_list,
        "truncated.npz": raw_npz[: len(raw_npz) // 2],
        "garbage.npz": rng.integers(0, 256, 200, dtype=np.uint8).tobytes(),
        "pickle.npz": b"\x80\x04\x95" + b"\x00" * 40,
    }
    npy = tmp_path / "array.npz"  # a bare .npy under an .npz name
    np.save(open(npy, "wb"), np.ones(3))
    paths = [str(npy)]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    return paths


def test_bad_weight_files_give_a_tensorc_error(tmp_path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(TensorcError) as info:
            weight_files.load(path)
        assert "\n" not in str(info.value), path
    with pytest.raises(TensorcError, match="not found"):
        weight_files.load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(TensorcError, match="should end in"):
        weight_files.save(str(tmp_path / "w.pt"), {"a": np.ones(1)})


# --- tracing -------------------------------------------------------------------------

def _branchy(x):
    if x.sum() > 0:  # control flow on a traced value
        return x
    return -x


def test_control_flow_on_traced_values_names_the_user_line():
    line = inspect.getsourcelines(_branchy)[1] + 1
    with pytest.raises(TraceError) as info:
        tensorc.trace(_branchy, np.ones((2, 3), np.float32))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{__file__}:{line}" in msg, msg
    assert "if x.sum() > 0" in msg, msg
    # eagerly the same function just runs
    assert _branchy(Tensor(np.ones(3, np.float32))).numpy().tolist() == [1, 1, 1]


def _to_float(x):
    return x * float(x.max())


def test_reading_a_traced_value_is_an_error():
    line = inspect.getsourcelines(_to_float)[1] + 1
    with pytest.raises(TraceError, match=rf"test_frontend.py:{line}"):
        tensorc.trace(_to_float, np.ones((2,), np.float32))


def test_eager_shape_errors_name_the_user_line():
    a, b = Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((4, 5), np.float32))
    line = inspect.currentframe().f_lineno + 2
    with pytest.raises(ShapeError) as info:
        a @ b
    msg = str(info.value)
    assert f"test_frontend.py:{line}" in msg and "f32[2,3]" in msg and "f32[4,5]" in msg, msg


def test_trace_names_inputs_and_outputs():
    def two(x, y):
        return {"total": x + y, "diff": x - y}
    g = tensorc.trace(two, np.ones(3, np.float32), y=tensorc.TensorSpec((3,), "f32"))
    assert [v.name for v in g.inputs] == ["x", "y"]
    assert [v.name for v in g.outputs] == ["total", "diff"]
    with pytest.raises(TraceError, match="takes 2"):
        tensorc.trace(two, np.ones(3), np.ones(3), np.ones(3))


def test_traced_module_matches_eager():
    net = TiedNet().init_weights(0)
    ids = np.array([[1, 5, 10], [0, 0, 3]])
    g = tensorc.trace(net, ids)
    assert {"emb", "hidden.weight"} <= set(g.constants)
    assert "head_weight" not in g.constants  # the tied weight is one constant
    np.testing.assert_array_equal(tensorc.compile(g)(ids), net(ids).numpy())


# --- indexing ------------------------------------------------------------------------

INDEXES = [
    np.s_[:, 0],
    np.s_[..., 1:3],
    np.s_[None],
    np.s_[-1],
    np.s_[:, -1],
    np.s_[-2],
    np.s_[1:, None, ::2],
    np.s_[..., -1, :],
    np.s_[0, 1:, -3],
    np.s_[:, :, None, 2:],
    np.s_[1],
]


@pytest.mark.parametrize("index", INDEXES, ids=repr)
def test_indexing_eager_and_traced_equal_numpy(index):
    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    want = x[index]
    got = Tensor(x)[index].numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    g = tensorc.trace(lambda x: x[index], x)
    np.testing.assert_array_equal(tensorc.compile(g)(x), want)


@pytest.mark.parametrize("make_index", [
    lambda idx: idx,
    lambda idx: (slice(None), idx),
    lambda idx: (Ellipsis, idx),
])
def test_integer_tensor_index(make_index):
    x = np.random.default_rng(1).standard_normal((5, 5, 5)).astype(np.float32)
    idx = np.array([4, 0, -1, 2])
    want = x[make_index(idx)]
    np.testing.assert_array_equal(Tensor(x)[make_index(Tensor(idx))].numpy(), want)
    np.testing.assert_array_equal(Tensor(x)[make_index(list(idx))].numpy(), want)
    g = tensorc.trace(lambda x, i: x[make_index(i)], x, idx)
    np.testing.assert_array_equal(tensorc.compile(g)(x, idx), want)


def test_bad_indexes():
    x = Tensor(np.ones((2, 3), np.float32))
    with pytest.raises(IndexError, match="out of range"):
        x[2]
    with pytest.raises(IndexError, match="too many"):
        x[0, 0, 0]
    with pytest.raises(IndexError, match="negative step"):
        x[::-1]
