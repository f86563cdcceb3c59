"""`Module` and `Parameter`: the PyTorch-like container API of the model DSL."""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from tensorc.errors import TensorcError

from . import weights as weight_files
from .tensor import Tensor


class Parameter(Tensor):
    """A weight. It holds no data until the owning model's `init_weights(seed)` runs
    its `init(rng, shape)`, so that values depend on the seed and the parameter's
    name, not on construction order."""

    __slots__ = ("init", "init_shape", "init_dtype")

    def __init__(self, shape, init: Callable[[np.random.Generator, tuple], np.ndarray],
                 dtype="float32"):
        super().__init__(None)
        self.init, self.init_shape, self.init_dtype = init, tuple(shape), np.dtype(dtype)

    @property
    def type(self):
        if self.data is None:
            raise TensorcError("parameter used before init_weights()")
        return super().type

    def reset(self, rng: np.random.Generator) -> None:
        self.data = np.asarray(self.init(rng, self.init_shape), dtype=self.init_dtype)


def normal(std: float = 0.02, mean: float = 0.0):
    return lambda rng, shape: rng.normal(mean, std, shape)


def constant(value: float):
    return lambda rng, shape: np.full(shape, value)


class Module:
    """Holds parameters, buffers (fixed tensors) and sub-modules as attributes.

    Subclasses define `forward`; calling the module calls it."""

    def __init__(self):
        object.__setattr__(self, "_children", {})

    def __setattr__(self, name, value):
        if "_children" not in self.__dict__:
            raise TensorcError(f"{type(self).__name__}.__init__ must call super().__init__()")
        if isinstance(value, (Tensor, Module)):
            self._children[name] = value
        elif isinstance(value, (list, tuple)) and value and \
                all(isinstance(v, Module) for v in value):
            value = ModuleList(value)
            self._children[name] = value
        object.__setattr__(self, name, value)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} defines no forward()")

    # -- traversal --
    def named_tensors(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """Every parameter and buffer once (a tied weight under its first name)."""
        seen: set[int] = set()
        for name, t in self._walk(prefix):
            if id(t) not in seen:
                seen.add(id(t))
                yield name, t

    def _walk(self, prefix):
        for name, child in self._children.items():
            full = f"{prefix}{name}"
            if isinstance(child, Module):
                yield from child._walk(full + ".")
            else:
                yield full, child

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        return ((n, t) for n, t in self.named_tensors() if isinstance(t, Parameter))

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.init_shape)) for p in self.parameters())

    # -- weights --
    def init_weights(self, seed: int = 0) -> Module:
        """Deterministic init: each parameter draws from a generator seeded by
        (seed, its name)."""
        for name, p in self.named_parameters():
            p.reset(np.random.default_rng([seed, zlib.crc32(name.encode())]))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: p.numpy() for n, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> Module:
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unknown = sorted(set(state) - set(params))
        if missing or unknown:
            raise TensorcError(f"weights do not fit {type(self).__name__}: "
                               f"missing {missing[:5]}, unknown {unknown[:5]}")
        for name, p in params.items():
            arr = np.asarray(state[name])
            if arr.shape != p.init_shape:
                raise TensorcError(f"weight {name!r}: expected shape {list(p.init_shape)}, "
                                   f"file has {list(arr.shape)}")
            p.data = arr.astype(p.init_dtype)
        return self

    def save_weights(self, path: str) -> None:
        """Write parameters to `.npz` or `.safetensors` (never pickle)."""
        weight_files.save(path, self.state_dict())

    def load_weights(self, path: str) -> Module:
        return self.load_state_dict(weight_files.load(path))


class ModuleList(Module):
    def __init__(self, modules):
        super().__init__()
        object.__setattr__(self, "_items", list(modules))
        for i, m in enumerate(self._items):
            self._children[str(i)] = m

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


class GraphModule(Module):
    """A graph as a model, so a rewritten graph (a pruned one, an imported ONNX model)
    trains like a built-in one: its float constants of rank >= 1 are its parameters,
    under their own names; `forward` takes the graph's inputs and replays its nodes
    (eagerly, or recording them while traced), returning its first output, or all of
    them as a tuple. `graph()` is the graph with the parameters' current data."""

    def __init__(self, source):
        super().__init__()
        object.__setattr__(self, "_source", source)
        for name, v in source.constants.items():
            if v.type.dtype in ("f16", "bf16", "f32", "f64") and v.type.rank >= 1:
                p = Parameter(v.type.shape, lambda rng, shape, d=v.data: d, v.data.dtype)
                p.data = np.array(v.data)   # its own: training updates it in place
                self._children[name] = p
        params = [inspect.Parameter(v.name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for v in source.inputs]

        def forward(*args, **kwargs):
            return self._replay(inspect.Signature(params).bind(*args, **kwargs).arguments)
        forward.__signature__ = inspect.Signature(params)   # what tracing names inputs by
        object.__setattr__(self, "forward", forward)

    def _replay(self, feeds: dict):
        from tensorc.ops import get_op

        from .tensor import apply, as_tensor
        g = self._source
        vals = {v: as_tensor(feeds[v.name]) for v in g.inputs}
        env = {d: n for v in g.inputs for d, n in zip(v.type.shape, vals[v].shape, strict=True)
               if isinstance(d, str) and isinstance(n, int)}   # symbols the call sizes
        for name, v in g.constants.items():
            vals[v] = self._children[name] if name in self._children else Tensor(v.data)
        for node in g.nodes:
            attrs = get_op(node.op).resolve_attrs(node.attrs, env)
            outs = apply(node.op, [vals[v] for v in node.inputs], **attrs)
            vals.update(zip(node.outputs, outs if isinstance(outs, tuple) else (outs,),
                            strict=True))
        outs = tuple(vals[v] for v in g.outputs)
        return outs[0] if len(outs) == 1 else outs

    def graph(self):
        """The source graph with each parameter's current data."""
        from tensorc.passes.rewrite import copy_graph
        g = copy_graph(self._source)
        for name, p in self.named_parameters():
            g.constants[name].data = np.asarray(p.data)
        return g
