"""The cupy GPU backend.

Without a GPU (or without cupy) this still checks: the package imports and the
backend says clearly why it is unavailable; every CUDA source the renderer makes
for the built-in models, plus the hand-written kernels, compiles with nvcc for
sm_80 and sm_90; and the backend's executable runs every tiny model end to end on
the CPU emulator (rendered CUDA kernels run as host threads) matching numpy.
The GPU tests at the bottom run only where cupy finds a CUDA device.
"""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tensorc
from tensorc.backends import get_backend
from tensorc.backends import lowering as L
from tensorc.backends.cupy import LOWERING, CupyBackend, _flash_fits, unavailable_reason
from tensorc.backends.cupy import kernels as lib
from tensorc.backends.cupy.attention_kernels import all_attention_kernels
from tensorc.backends.cupy.cuda_codegen import render_kernel
from tensorc.errors import TensorcError
from tensorc.models import get, list_models
from tensorc.passes import PIPELINES, run_pipeline

PIPES = ["O0"] + (["O2"] if "O2" in PIPELINES else [])
MODELS = list(list_models())
GPU_REASON = unavailable_reason()


def _traced(name, preset="tiny", batch=1, seq=None):
    model = get(name, preset)
    feeds = model.example_inputs(batch) if seq is None else model.example_inputs(batch, seq)
    return tensorc.trace(model, **feeds), feeds


def _rel_err(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
               for g, w in zip(got, want, strict=True))


# --- without a GPU -----------------------------------------------------------------------

def test_backend_module_imports_without_cupy():
    """With cupy made unimportable, tensorc and the backend module import, and
    compiling names the missing package and how to install it."""
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import tensorc, tensorc.backends.cupy\n"
            "from tensorc.backends import get_backend\n"
            "from tensorc.errors import TensorcError\n"
            "g = tensorc.trace(lambda x: x * 2.0, tensorc.TensorSpec((3,)))\n"
            "try:\n    get_backend('cupy').compile(g)\nexcept TensorcError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cupy backend is unavailable: cupy is not installed" in out.stdout
    assert "pip install tensorc[gpu]" in out.stdout


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present: the backend is available")
def test_compile_says_why_it_is_unavailable():
    g = tensorc.trace(lambda x: x * 2.0, tensorc.TensorSpec((3,)))
    assert get_backend("cupy").unavailable_reason() == GPU_REASON
    with pytest.raises(TensorcError, match="cupy backend is unavailable") as e:
        get_backend("cupy").compile(g)
    assert GPU_REASON in str(e.value)


def test_bad_options_are_one_line_errors():
    with pytest.raises(TensorcError, match="unknown precision 'bf8'"):
        CupyBackend(precision="bf8")
    with pytest.raises(TensorcError, match="outputs must be"):
        CupyBackend(outputs="torch")


def _program_kernels(graph) -> dict[str, str]:
    """name -> CUDA source of every kernel the backend would load for `graph`."""
    program = L.lower(graph, {}, **LOWERING)
    out = {k.name: render_kernel(k).source for k in program.kernels}
    for s in program.steps:
        if isinstance(s, L.Call) and s.op == "attention" and _flash_fits(s):
            k = lib.flash_attention_kernel(s.inputs[0].shape[3], s.inputs[2].shape[3])
            out[k.name] = k.source
    return out


def _nvcc(path, arch, tmp_path):
    out = tmp_path / f"{path.stem}.{arch}.ptx"
    proc = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", "-std=c++17", str(path),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_generated_cuda_source_compiles(tmp_path):
    """All kernels for every model x preset x pipeline, plus the library kernels, as one
    translation unit (kernel names are content hashes, so duplicates are the same
    kernel), compiled for sm_80 and sm_90; and one emit_source file on its own."""
    kernels: dict[str, str] = {}
    emitted = None
    for name in MODELS:
        for preset in list_models()[name]:
            g0, _ = _traced(name, preset)
            for pipe in PIPES:
                g = run_pipeline(g0, pipe)
                kernels.update(_program_kernels(g))
                if emitted is None:
                    emitted = CupyBackend().emit_source(g, str(tmp_path / "emit"))[0]
    for g, _ in _train_steps():   # forward + backward: the gradient ops' kernels
        kernels.update(_program_kernels(g))
    for k in lib.all_library_kernels() + all_attention_kernels():
        kernels.setdefault(k.name, k.source)
    unit = tmp_path / "all_kernels.cu"
    unit.write_text("\n".join(kernels.values()))
    jobs = [(unit, "sm_80"), (unit, "sm_90"), (Path(emitted), "sm_80")]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda j: _nvcc(*j, tmp_path), jobs))
    for (path, arch), (rc, log) in zip(jobs, results, strict=True):
        assert rc == 0, f"nvcc -arch={arch} failed on {path.name}:\n{log[-6000:]}"
    ptx = (tmp_path / "all_kernels.sm_90.ptx").read_text()
    assert ptx.count(".entry") == len(kernels)   # every kernel made it into the PTX


def _train_steps():
    """Training steps (loss and every weight's gradient) of tiny models, and their feeds."""
    from tensorc.training import example_batch, get_task, step_graph
    for name, task, sets in [("gpt", "clm", {"dropout": 0.1}), ("bert", "mlm", {}),
                             ("vit", "classify", {"image_size": 8, "patch_size": 4,
                                                  "channels": 1})]:
        model = get(name, "tiny", **sets)
        batch = example_batch(model, task, batch=1, seq=None if name == "vit" else 8)
        if sets.get("dropout"):
            batch["dropout_seed"] = np.array(5, np.int64)
        g, _ = step_graph(model, get_task(task), batch)
        yield g, {**batch, **{n: p.data for n, p in model.named_parameters()}}


def test_train_steps_on_emulator_match_numpy():
    """Forward + backward (fused attention backward as its decomposition, scatter_add,
    conv2d_grad, dropout's hash) all on the device, with numpy's numbers. Errors are
    measured against each model's largest gradient: some true gradients are zero (a
    key bias's: softmax ignores a constant added to every score), left as rounding."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    for g, feeds in _train_steps():
        want = get_backend("numpy").compile(g).run(feeds)
        exe = CupyBackend().compile(g, runtime=EmulatedRuntime())
        got = exe.run(feeds)
        assert exe.stats["fallbacks"] == []
        scale = max(float(np.abs(w).max()) for w in want.values())
        assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4 * scale, g.name


def test_emit_source_needs_sizes_for_symbolic_dims(tmp_path):
    model = get("gpt", "tiny")
    g = tensorc.trace(model, input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    with pytest.raises(TensorcError, match="symbolic dims batch, seq"):
        CupyBackend().emit_source(g, str(tmp_path))
    paths = CupyBackend().emit_source(g, str(tmp_path), env={"batch": 2, "seq": 8})
    text = open(paths[0]).read()
    assert 'extern "C" __global__' in text and "#include" not in text


# --- the executable end to end, on the CPU emulator ----------------------------------------

@pytest.mark.parametrize("pipe", PIPES)
@pytest.mark.parametrize("name", MODELS)
def test_executable_on_emulator_matches_numpy(name, pipe):
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    # small: emulated threads are slow (vit's sequence is set by its image size)
    g, feeds = _traced(name, batch=1, seq=None if name == "vit" else 8)
    g = run_pipeline(g, pipe)
    want = get_backend("numpy").compile(g)(**feeds)
    runtime = EmulatedRuntime()
    exe = CupyBackend().compile(g, runtime=runtime)
    got = exe(**feeds)
    assert runtime.launches > 0 and exe.stats["fallbacks"] == []   # all on the device
    assert _rel_err(got, want) < 1e-4
    again = exe(**feeds)    # second call reuses the Program, arena and kernels
    assert exe.stats["programs"] == 1 and _rel_err(again, got) == 0


def test_cuda_graph_logic_on_emulator():
    """Capture once, then replay: same numbers as eager runs for new inputs too; the
    token-id check still runs before each replay; a program with a host fallback is
    not captured (its host round trip fails while recording) and runs eagerly."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    g, feeds = _traced("gpt", batch=1, seq=8)
    g = run_pipeline(g, PIPES[-1])
    eager = CupyBackend(cuda_graph=False).compile(g, runtime=EmulatedRuntime())
    graphed = CupyBackend().compile(g, runtime=EmulatedRuntime(can_capture=True))
    first, second = graphed(**feeds), graphed(**feeds)
    assert graphed.stats["graph_replays"] == 2 and graphed.stats["eager_runs"] == 0
    assert _rel_err(first, eager(**feeds)) == 0 and _rel_err(second, first) == 0
    other = get("gpt", "tiny").example_inputs(1, 8, seed=1)
    assert _rel_err(graphed(**other), eager(**other)) == 0
    bad = {"input_ids": other["input_ids"].copy()}
    bad["input_ids"][0, 0] = 10_000
    with pytest.raises(TensorcError, match="index 10000 is out of range"):
        graphed(**bad)
    # A Program with a host step (a grouped conv2d has no lowering and runs its numpy
    # reference): never captured, runs eagerly, still right.
    x = tensorc.Graph("host")
    a = x.add_input("a", tensorc.TensorType((1, 4, 9, 9), "f32"))
    w = x.add_input("w", tensorc.TensorType((4, 2, 3, 3), "f32"))
    x.outputs = [x.add("conv2d", x.add("mul", a, a), w, group=2)]
    exe = CupyBackend().compile(x, runtime=EmulatedRuntime(can_capture=True))
    rng = np.random.default_rng(0)
    arr, wts = (rng.standard_normal(s).astype(np.float32) for s in ((1, 4, 9, 9), (4, 2, 3, 3)))
    want = tensorc.compile(x, "numpy")(arr, wts)
    assert _rel_err(exe(arr, wts), want) <= 1e-5
    assert exe.stats["graph_replays"] == 0 and exe.stats["eager_runs"] == 1


# --- on a GPU ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU tests: {GPU_REASON}")


@gpu
@pytest.mark.parametrize("pipe", PIPES)
@pytest.mark.parametrize("name", MODELS)
def test_gpu_matches_numpy(name, pipe):
    g, feeds = _traced(name, batch=2)
    g = run_pipeline(g, pipe)
    want = get_backend("numpy").compile(g)(**feeds)
    exe = get_backend("cupy").compile(g)
    assert _rel_err(exe(**feeds), want) < 1e-4


@gpu
def test_gpu_cuda_graph_replay_matches_eager():
    g, feeds = _traced("gpt", batch=2)
    g = run_pipeline(g, PIPES[-1])
    eager = CupyBackend(cuda_graph=False).compile(g)
    graphed = CupyBackend(cuda_graph=True).compile(g)
    want = eager(**feeds)
    first, second = graphed(**feeds), graphed(**feeds)
    assert graphed.stats["graph_replays"] >= 1, "static shapes should be captured"
    assert _rel_err(first, want) < 1e-6 and _rel_err(second, want) < 1e-6
    other = get("gpt", "tiny").example_inputs(2, seed=1)   # new inputs, same graph
    assert _rel_err(graphed(**other), eager(**other)) < 1e-6


@gpu
def test_gpu_device_arrays_in_and_out():
    import cupy
    g, feeds = _traced("bert", batch=2)
    want = get_backend("numpy").compile(g)(**feeds)
    exe = CupyBackend(outputs="cupy").compile(g)
    got = exe(**{k: cupy.asarray(v) for k, v in feeds.items()})
    assert isinstance(got, cupy.ndarray)
    assert _rel_err(cupy.asnumpy(got), want) < 1e-4


@gpu
@pytest.mark.parametrize("precision,budget", [("tf32", 1e-2), ("fp16", 2e-2)])
def test_gpu_reduced_precision_within_budget(precision, budget):
    g, feeds = _traced("gpt", batch=2)
    want = get_backend("numpy").compile(g)(**feeds)
    assert _rel_err(CupyBackend(precision=precision).compile(g)(**feeds), want) < budget


@gpu
def test_gpu_train_steps_match_numpy():
    """Forward + backward of gpt (with dropout), bert and vit on the device."""
    for g, feeds in _train_steps():
        want = get_backend("numpy").compile(g).run(feeds)
        exe = get_backend("cupy").compile(g)
        got = exe.run(feeds)
        scale = max(float(np.abs(w).max()) for w in want.values())
        assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4 * scale, g.name


@gpu
def test_gpu_bad_token_id_is_a_clear_error():
    g, feeds = _traced("gpt", batch=1)
    feeds["input_ids"] = feeds["input_ids"].copy()
    feeds["input_ids"][0, 0] = 10_000
    with pytest.raises(TensorcError, match="out of range"):
        get_backend("cupy").compile(g)(**feeds)


def test_device_inputs_are_read_in_place_on_emulator():
    """Eager runs read contiguous device inputs where they are (no copy into the arena);
    a non-contiguous one is copied. Both give the numpy result."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    g, feeds = _traced("bert", batch=1, seq=8)
    want = get_backend("numpy").compile(g)(**feeds)
    exe = CupyBackend(cuda_graph=False).compile(g, runtime=EmulatedRuntime(device_inputs=True))
    assert _rel_err(exe(**feeds), want) < 1e-4
    assert exe.stats["inputs_in_place"] == len(feeds)
    strided = {k: np.repeat(v, 2, axis=-1)[..., ::2] for k, v in feeds.items()}
    assert _rel_err(exe(**strided), want) < 1e-4
    assert exe.stats["inputs_in_place"] == len(feeds)   # not in place the second time


def test_f16_values_move_through_kernels_bit_exactly():
    """Lowering gives kernels no f16 arithmetic (exp runs its reference), but f16 data
    is copied and transposed by generated kernels: bits must survive."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    x = tensorc.Graph("half")
    a = x.add_input("a", tensorc.TensorType((4, 8), "f16"))
    x.outputs = [x.add("transpose", x.add("exp", a), perm=(1, 0))]
    runtime = EmulatedRuntime()
    exe = CupyBackend().compile(x, runtime=runtime)
    arr = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float16)
    out = exe(arr)
    assert runtime.launches == 1 and out.dtype == np.float16
    np.testing.assert_array_equal(out, np.exp(arr).T)


def test_host_steps_are_counted_as_fallbacks_on_emulator(monkeypatch):
    """An attention the flash kernel cannot take (head dim 160 > 128) runs its numpy
    reference on the host: listed in stats["fallbacks"], an error in strict mode."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    g = tensorc.Graph("wide")
    q, k, v = (g.add_input(n, tensorc.TensorType((1, 1, 4, 160), "f32")) for n in "qkv")
    g.outputs = [g.add("attention", q, k, v, scale=0.1)]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 1, 4, 160)).astype(np.float32) for _ in range(3)]
    exe = CupyBackend().compile(g, runtime=EmulatedRuntime())
    want = get_backend("numpy").compile(g)(*arrays)
    assert _rel_err(exe(*arrays), want) < 1e-5
    assert [f["reason"] for f in exe.stats["fallbacks"]] == [
        "the flash-attention kernel takes float32 with head dims <= 128 and a contiguous "
        "head dim"]
    monkeypatch.setenv("TENSORC_STRICT", "1")
    with pytest.raises(TensorcError, match="strict mode: 1 op"):
        CupyBackend().compile(g, runtime=EmulatedRuntime())(*arrays)


def test_run_writes_into_out_arrays_on_emulator():
    """`run(feeds, out=...)` as on every backend: the caller's numpy arrays, checked."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    from tensorc.errors import InputError
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    g, feeds = _traced("gpt", batch=1, seq=8)
    exe = CupyBackend(cuda_graph=False).compile(g, runtime=EmulatedRuntime())
    (name,) = exe.output_names
    want = exe.run(feeds)[name]
    out = np.empty_like(want)
    assert exe.run(feeds, out={name: out})[name] is out
    assert _rel_err(out, want) == 0
    with pytest.raises(InputError, match="expected a writeable C-contiguous"):
        exe.run(feeds, out={name: np.empty(want.shape, np.float64)})


def test_a_reduction_that_accumulates_in_memory_is_not_split_across_threads():
    """A sum over leading axes keeps its partial sums in the output (column blocks):
    splitting its row loop across a block's threads would race on them."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    from tensorc.ir import Graph, TensorType
    g = Graph("colsum")
    x = g.add_input("x", TensorType((64, 128), "f32"))
    g.outputs = [g.add("reduce_sum", x, axes=(0,))]
    program = L.lower(g, {}, **LOWERING)
    kernels = [render_kernel(k) for k in program.kernels]
    assert kernels and not any(k.cooperative for k in kernels)
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    xs = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    exe = CupyBackend().compile(g, runtime=EmulatedRuntime())
    for _ in range(3):
        np.testing.assert_allclose(exe(xs), xs.sum(0), rtol=1e-5, atol=1e-5)


def test_topk_scatter_and_reduce_prod_on_emulator():
    """The kernels of ONNX's TopK (NaN and ties), scatters and ReduceProd, rendered for
    CUDA, on the emulator: numpy's numbers, nothing through a reference fallback."""
    from tensorc.backends.cupy.emulate import EmulatedRuntime, host_compiler
    if host_compiler() is None:
        pytest.skip("g++ not installed: the CUDA emulator needs a C++20 host compiler")
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 3, (4, 70)).astype(np.float32)
    x[0, 3] = np.nan
    cases = [("topk", [x], {"k": 5}), ("topk", [x], {"k": 3, "axis": 0, "largest": False}),
             ("reduce_prod", [rng.uniform(-2, 2, (5, 40)).astype(np.float32)], {"axes": (1,)})]
    cases += [("scatter", [rng.standard_normal((5, 6)).astype(np.float32), np.array([4, 0, -1, 4]),
                           rng.standard_normal((4, 6)).astype(np.float32)],
               {"axis": 0, "reduction": red}) for red in ("none", "add", "mul", "max", "min")]
    for op, inputs, attrs in cases:
        g = tensorc.Graph("t")
        xs = [g.add_input(f"x{i}", tensorc.TensorType.of(a)) for i, a in enumerate(inputs)]
        g.outputs = g.add_node(op, xs, attrs)
        feeds = {f"x{i}": a for i, a in enumerate(inputs)}
        want = get_backend("numpy").compile(g).run(feeds)
        exe = CupyBackend().compile(g, runtime=EmulatedRuntime())
        got = exe.run(feeds)
        assert exe.stats["fallbacks"] == []
        for k, w in want.items():
            np.testing.assert_allclose(got[k], w, rtol=1e-6, err_msg=f"{op} {attrs}")
