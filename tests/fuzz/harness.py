"""Hostile inputs, generated: each case must end in success or in exactly one
`tensorc: error:` line with exit status 2. A failure is a traceback (an exception
escaping the CLI), a hang (past the per-case timeout), a crash (the process dies:
run this in a child process) or a compiled result that differs from the numpy
reference.

Cases mutate a small corpus made at start-up: ONNX models (bytes flipped or cut, or
attributes, dims and inputs changed through the onnx API), artifacts (their IR text
and JSON metadata edited, or their zip bytes damaged), IR text, npz and safetensors
files, and command lines (flags and values picked from good and bad ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

INTERESTING = [0, -1, 1, 2, 3, 7, -7, 63, -63, 2**31, -2**31, 2**63 - 1, 10**30]


@dataclasses.dataclass
class Report:
    cases: int = 0
    ok: int = 0
    errors: int = 0
    failures: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    kinds: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        return (f"{self.cases} cases in {self.seconds:.1f} s ({kinds}): {self.ok} ran, "
                f"{self.errors} one-line errors, {len(self.failures)} failures")


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout


def cli(argv: list[str], timeout: float) -> tuple[int | str, str, str]:
    """Run the CLI in this process: (exit status or 'traceback'/'hang', stdout, stderr)."""
    from tensorc.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except _Timeout:
        rc = "hang"
    except SystemExit as e:   # argparse outside main's handler would be a bug too
        rc = "traceback" if e.code not in (0, 2) else e.code
    except BaseException:
        rc = "traceback"
        err.write(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def judge(rc, err: str) -> str | None:
    """None if the outcome is acceptable, else what is wrong."""
    if rc == 0:
        return None
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 2 and lines and lines[-1].startswith("tensorc: error:") and \
            sum(ln.startswith("tensorc: error:") for ln in lines) == 1 and \
            "Traceback" not in err:
        return None
    return f"exit {rc}: " + (err.strip().splitlines() or ["(no message)"])[-1][:300]


# --- the corpus -----------------------------------------------------------------------

def make_corpus(folder: Path) -> dict[str, Path]:
    import tensorc
    from tensorc.frontend import onnx as onnx_io
    from tensorc.text import format_graph
    g = tensorc.Graph("small")
    x = g.add_input("x", tensorc.TensorType(("batch", 4), "f32"))
    w = g.add_constant("w", np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    h = g.add("matmul", x, w)
    g.outputs = [g.add("softmax", g.add("add", h, g.add("tanh", h)), axis=-1)]
    paths = {"small.onnx": folder / "small.onnx", "gpt.onnx": folder / "gpt.onnx",
             "gpt.tensorc": folder / "gpt.tensorc", "x.npz": folder / "x.npz",
             "w.safetensors": folder / "w.safetensors", "small.ir": folder / "small.ir"}
    onnx_io.save(g, paths["small.onnx"])
    gpt = tensorc.models.get("gpt", "tiny", n_layer=1)
    gg = tensorc.trace(gpt, input_ids=tensorc.TensorSpec(("batch", "seq"), "i64"))
    onnx_io.save(gg, paths["gpt.onnx"])
    from tensorc.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["compile", "gpt", "--preset", "tiny", "--set", "n_layer=1", "--seq", "8",
              "-o", str(paths["gpt.tensorc"])])
    np.savez(paths["x.npz"], x=np.ones((2, 4), np.float32))
    gpt.save_weights(str(paths["w.safetensors"]))
    paths["small.ir"].write_text(format_graph(g))
    return paths


# --- mutators -------------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(max(len(b), 1))
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.randrange(256)
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif b:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 64)]
    return bytes(b)


def mutate_text(rng: random.Random, text: str) -> str:
    import re
    numbers = list(re.finditer(r"-?\d+", text))
    if numbers and rng.random() < 0.6:
        m = rng.choice(numbers)
        return text[:m.start()] + str(rng.choice(INTERESTING + [1.5, "seq", "[["]) ) + \
            text[m.end():]
    return mutate_bytes(rng, text.encode()).decode("utf-8", "replace")


def mutate_onnx(rng: random.Random, data: bytes) -> bytes:
    import onnx
    if rng.random() < 0.4:
        return mutate_bytes(rng, data)
    model = onnx.load_from_string(data)
    nodes = list(model.graph.node)
    choice = rng.randrange(4)
    if choice == 0 and nodes:     # an attribute gets an odd value
        node = rng.choice(nodes)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice(INTERESTING[:-1])
            elif a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice(INTERESTING[:-1])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([0.0, -1.0, float("inf"), float("nan"), 1e30])
    elif choice == 1:             # an input or output dim changes
        vi = rng.choice(list(model.graph.input) + list(model.graph.output))
        dims = vi.type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            if rng.random() < 0.5:
                d.dim_value = rng.choice([0, 1, 2, 3, 5, 2**40])
            else:
                d.dim_param = rng.choice(["seq", "batch", "2*seq", "n", "x y"])
    elif choice == 2 and nodes:   # a node reads another value, or loses an input
        node = rng.choice(nodes)
        names = [i.name for i in model.graph.initializer] + [o for n in nodes for o in n.output]
        if node.input and rng.random() < 0.5:
            node.input[rng.randrange(len(node.input))] = rng.choice(names + [""])
        elif node.input:
            del node.input[-1]
    elif nodes:                   # an initializer's dims or data are damaged
        inits = list(model.graph.initializer)
        if inits:
            t = rng.choice(inits)
            if t.dims and rng.random() < 0.5:
                t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 2**31])
            else:
                t.raw_data = mutate_bytes(rng, t.raw_data)
    return model.SerializeToString()


def mutate_artifact(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(rng, data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    name = rng.choice(["__graph__.npy", "__meta__.npy"] + list(members))
    arr = np.load(io.BytesIO(members[name]), allow_pickle=False)
    if arr.dtype == np.uint8:      # the IR text or the JSON metadata
        text = mutate_text(rng, arr.tobytes().decode("utf-8", "replace"))
        arr = np.frombuffer(text.encode(), np.uint8)
    else:
        arr = np.asarray(mutate_bytes(rng, arr.tobytes()[:64]))
    buf = io.BytesIO()
    np.save(buf, arr)
    members[name] = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    return out.getvalue()


FLAGS = {
    "--preset": ["tiny", "small", "huge", ""], "--seq": ["1", "8", "0", "-3", "1e9", "x"],
    "--batch": ["1", "2", "0", "99999999999"], "--seed": ["0", "7", "-1", "2**70"],
    "--set": ["n_layer=1", "n_head=0", "d_model=7", "vocab_size=-1", "eps=0.0", "nope=1",
              "n_layer=1.5", "max_seq_len=2"],
    "--passes": ["O0", "O1", "O2", "O3", "fuse-attention", "nonsense", "O2,O2"],
    "--backend": ["numpy", "llvm", "cupy", "gpu"], "--format": ["text", "json", "dot", "x"],
}


def random_cli(rng: random.Random, files: dict[str, Path], tmp: Path) -> list[str]:
    cmd = rng.choice(["run", "inspect", "compare", "compile", "export", "models"])
    model = rng.choice(["gpt", "bert", "vit", "transformer", "nope",
                        *(str(p) for p in files.values()), str(tmp / "missing.onnx")])
    argv = [cmd, model]
    for _ in range(rng.randint(0, 3)):
        flag = rng.choice(list(FLAGS))
        argv += [flag, rng.choice(FLAGS[flag])]
    if cmd in ("compile", "export") or rng.random() < 0.2:
        argv += ["-o", str(tmp / rng.choice(["out.bin", "out.onnx", "sub/x"]))]
    if cmd == "run" and rng.random() < 0.3:
        argv += ["--input", rng.choice([str(p) for p in files.values()])]
    if cmd == "compare":
        argv += ["--repeat", "1"]
    return argv


# --- the run ----------------------------------------------------------------------------

def _well_conditioned(path: str) -> bool:
    """Weights a mutation left finite and moderate: only then must float32 results agree
    to 1e-4 whatever the order of operations (1e35 weights cancel catastrophically)."""
    import onnx
    from onnx import numpy_helper
    for t in onnx.load(path).graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and a.size and not (np.isfinite(a).all()
                                                   and np.abs(a).max() < 1e4):
            return False
    return True


def _same_as_numpy(argv: list[str], tmp: Path, timeout: float) -> str | None:
    """For a `run --backend llvm` that succeeded: the numpy reference must agree."""
    if not _well_conditioned(argv[1]):
        return None
    outs = []
    for backend in ("llvm", "numpy"):
        path = tmp / f"oracle_{backend}.npz"
        rc, _, err = cli([*argv, "--backend", backend, "--output", str(path)], timeout)
        if rc != 0:
            return None if backend == "llvm" else f"numpy failed where llvm ran: {err[-200:]}"
        with np.load(path) as f:
            outs.append({k: f[k] for k in f.files})
    for k, want in outs[1].items():
        got = outs[0][k]
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5,
                                                       equal_nan=True):
            return f"llvm output {k!r} differs from numpy"
    return None


def run(cases: int, seed: int, timeout: float, log=None, progress: str | None = None,
        keep: str | None = None) -> Report:
    report = Report()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ.setdefault("TENSORC_CACHE_DIR", str(tmp / "cache"))
        files = make_corpus(tmp)
        data = {k: p.read_bytes() for k, p in files.items()}
        rng = random.Random(seed)
        for i in range(cases):
            kind = rng.choice(["onnx", "onnx", "artifact", "ir", "npz", "safetensors", "cli"])
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            if progress:
                Path(progress).write_text(f"case {i} ({kind}), seed {seed}\n")
            case = tmp / f"case{i % 2}"
            problem = None
            if kind == "onnx":
                src = rng.choice(["small.onnx", "gpt.onnx"])
                path = case.with_suffix(".onnx")
                path.write_bytes(mutate_onnx(rng, data[src]))
                argv = ["run", str(path), "--backend", "llvm"]
            elif kind == "artifact":
                path = case.with_suffix(".tensorc")
                path.write_bytes(mutate_artifact(rng, data["gpt.tensorc"]))
                argv = ["run", str(path), "--backend", rng.choice(["numpy", "llvm"])]
            elif kind == "ir":
                problem = _ir_case(rng, data["small.ir"].decode(), timeout)
                argv = None
            elif kind == "npz":
                path = case.with_suffix(".npz")
                path.write_bytes(mutate_bytes(rng, data["x.npz"]))
                argv = ["run", str(files["small.onnx"]), "--input", str(path)]
            elif kind == "safetensors":
                problem = _weights_case(rng, data["w.safetensors"], case)
                argv = None
            else:
                argv = random_cli(rng, files, tmp)
            if argv is not None:
                rc, _, err = cli(argv, timeout)
                problem = judge(rc, err)
                if problem is None and rc == 0 and kind == "onnx":
                    problem = _same_as_numpy(argv[:2], tmp, timeout)
                if problem is None:
                    report.ok += rc == 0
                    report.errors += rc != 0
            elif problem is None:
                report.ok += 1
            if problem:
                report.failures.append((i, kind, argv, problem))
                if keep and argv and kind in ("onnx", "artifact", "npz"):
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    src = Path(argv[1] if kind != "npz" else argv[3])
                    shutil.copy(src, Path(keep) / f"case{i}{src.suffix}")
                if log:
                    print(f"case {i} ({kind}) {argv or ''}: {problem}", file=log, flush=True)
            report.cases += 1
    report.seconds = time.perf_counter() - start
    return report


def _ir_case(rng: random.Random, text: str, timeout: float) -> str | None:
    """Mutated IR text must parse, or fail with one TensorcError line."""
    from tensorc.errors import TensorcError
    from tensorc.text import parse_graph
    bad = mutate_text(rng, text)
    try:
        parse_graph(bad)
    except TensorcError as e:
        return None if "\n" not in str(e) else f"multi-line error: {str(e)[:200]}"
    except Exception as e:
        return f"{type(e).__name__} from parse_graph: {str(e)[:200]}"
    return None


def _weights_case(rng: random.Random, data: bytes, case: Path) -> str | None:
    """Mutated weight files must load, or fail with one TensorcError line."""
    from tensorc.errors import TensorcError
    from tensorc.frontend import weights
    path = case.with_suffix(".safetensors" if rng.random() < 0.5 else ".npz")
    if path.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, a=np.ones((3, 4), np.float32), b=np.arange(5))
        data = buf.getvalue()
    path.write_bytes(mutate_bytes(rng, data))
    try:
        weights.load(str(path))
    except TensorcError as e:
        return None if "\n" not in str(e) else f"multi-line error: {str(e)[:200]}"
    except Exception as e:
        return f"{type(e).__name__} from weights.load: {str(e)[:200]}"
    return None
