"""Training's optimizer side: SGD and AdamW as generated code, gradient clipping and
accumulation, learning-rate schedules, and checkpoints.

An optimizer's whole update (every parameter, its gradient and its state) is one
tensorc graph: per parameter the elementwise formula of `torch.optim.SGD` /
`torch.optim.AdamW` (their single-tensor, non-foreach forms), the hyper-parameters that
change from step to step (the learning rate, AdamW's bias corrections, SGD's first-step
switch) rank-0 float32 inputs, so it compiles once. The O2 pipeline fuses each
parameter's chain (`fuse-regions`), the chosen backend compiles it, and
`exe.run(feeds, out=...)` writes the new values.

In place: the update's outputs are the parameter and state arrays themselves (`out=`
the very arrays fed as inputs). The llvm lowering lists, per output, the inputs its one
kernel reads only at the element it writes and nothing reads later
(`Program.in_place`): such an input passed as the output's `out` is updated in place,
with no copy (an `out` overlapping any other input is computed aside, then copied).
Every output of these updates qualifies; `benchmarks/optim.py` measures it.

Checkpoints are a folder: `model.safetensors`, `optimizer.safetensors` and
`trainer.json` (step, the optimizer's hyper-parameters, the schedule, the numpy RNG
state, the caller's `extra`); nothing is pickled. A resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import TensorcError
from .ir import Graph
from .types import TensorType

__all__ = ["SGD", "AdamW", "Checkpoint", "Constant", "GradAccumulator", "Optimizer",
           "WarmupCosine", "clip_grad_norm", "load_checkpoint", "save_checkpoint",
           "schedule_from_dict"]

F32 = np.dtype(np.float32)


# --- optimizers -------------------------------------------------------------------------

class Optimizer:
    """What SGD and AdamW share: the parameters (float32 arrays, updated in place), the
    state tensors per parameter, the compiled update, `state_dict`/`load_state_dict`.

    Subclasses name their state (`STATE`), the per-step scalars (`SCALARS`), build one
    parameter's update (`_build`) and compute the scalars for a step (`_scalars`)."""

    STATE: tuple[str, ...] = ()
    SCALARS: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray], lr: float, backend: str):
        if not params:
            raise TensorcError("the optimizer was given no parameters")
        self.params: dict[str, np.ndarray] = {}
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype != F32 or not p.flags.c_contiguous \
                    or not p.flags.writeable:
                what = (f"{p.dtype}{list(p.shape)}" if isinstance(p, np.ndarray)
                        else type(p).__name__)
                raise TensorcError(f"parameter {name!r}: expected a writeable C-contiguous "
                                   f"float32 numpy array, got {what}")
            self.params[name] = p
        reach, last = -1, None   # updated in place, one at a time: no two may overlap
        for lo, hi, name in sorted((p.ctypes.data, p.ctypes.data + p.nbytes, n)
                                   for n, p in self.params.items() if p.nbytes):
            if lo < reach:
                raise TensorcError(f"parameters {last!r} and {name!r} share memory (tied "
                                   "weights: give the optimizer one of them)")
            if hi > reach:
                reach, last = hi, name
        self.names = list(self.params)
        self.lr = float(lr)
        self.step_count = 0
        self.backend = backend
        self.state = {k: {n: np.zeros_like(p) for n, p in self.params.items()}
                      for k in self.STATE}
        self._scalar = {s: np.zeros((), F32) for s in self.SCALARS}
        self._exe = None
        self._exe_key = None

    # -- the hyper-parameters a subclass keeps --
    def hyper(self) -> dict:
        """The JSON-able hyper-parameters and step count (`load_state_dict` takes them)."""
        return {"type": type(self).__name__, "step": self.step_count, "lr": self.lr}

    def _set_hyper(self, hyper: dict) -> None:
        self.step_count = int(hyper["step"])
        self.lr = float(hyper["lr"])

    def _structure(self) -> tuple:
        """What the graph's shape depends on besides the parameters (rebuilt on change)."""
        return ()

    # -- the graph --
    def _graph(self) -> Graph:
        g = Graph(type(self).__name__.lower() + "_update")
        scalars = {s: g.add_input(s, TensorType((), "f32")) for s in self.SCALARS}
        outputs = []
        for i, name in enumerate(self.names):
            t = TensorType((self.params[name].size,), "f32")
            p = g.add_input(f"p{i}", t)
            grad = g.add_input(f"g{i}", t)
            state = {k: g.add_input(f"{k}{i}", t) for k in self.STATE}
            new_p, new_state = self._build(g, p, grad, state, scalars)
            for v, n in [(new_p, f"p{i}_new")] + [(new_state[k], f"{k}{i}_new")
                                                   for k in self.STATE]:
                if not g.rename(v, n):
                    raise AssertionError(f"cannot name {v.name} {n}")
                outputs.append(v)
        g.outputs = outputs
        return g

    def _compiled(self):
        key = (self.backend, self._structure())
        if self._exe is None or self._exe_key != key:
            from tensorc.backends import get_backend
            from tensorc.passes import run_pipeline
            self._exe = get_backend(self.backend).compile(run_pipeline(self._graph(), "O2"))
            self._exe_key = key
        return self._exe

    # -- a step --
    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """One update of every parameter from its gradient (a float32 array of its shape;
        others are converted), in place; `lr` sets the learning rate from this step on."""
        missing = [n for n in self.names if n not in grads]
        extra = [n for n in grads if n not in self.params]
        if missing or extra:
            raise TensorcError("gradients do not match the parameters: " + "; ".join(
                s for s in (f"missing {missing[:5]}" if missing else "",
                            f"unknown {extra[:5]}" if extra else "") if s))
        checked = []
        for n in self.names:
            g = grads[n]
            if not (isinstance(g, np.ndarray) and g.dtype == F32 and g.flags.c_contiguous):
                g = np.asarray(g, dtype=F32, order="C")
            if g.shape != self.params[n].shape:
                raise TensorcError(f"gradient {n!r}: shape {list(g.shape)}, the parameter's "
                                   f"is {list(self.params[n].shape)}")
            checked.append(g)
        if lr is not None:
            self.lr = float(lr)
        self.step_count += 1
        for s, value in self._scalars().items():
            self._scalar[s][...] = value
        feeds: dict[str, np.ndarray] = dict(self._scalar)
        out: dict[str, np.ndarray] = {}
        for i, (n, g) in enumerate(zip(self.names, checked, strict=True)):
            # flat views of the caller's arrays, each fed and given as its update's `out`
            feeds[f"p{i}"] = out[f"p{i}_new"] = self.params[n].reshape(-1)
            feeds[f"g{i}"] = g.reshape(-1)
            for k in self.STATE:
                feeds[f"{k}{i}"] = out[f"{k}{i}_new"] = self.state[k][n].reshape(-1)
        self._compiled().run(feeds, out=out)

    # -- state --
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state tensors, named "<state>.<parameter>" (the hyper-parameters
        and step count are `hyper()`)."""
        return {f"{k}.{n}": self.state[k][n].copy() for k in self.STATE for n in self.names}

    def load_state_dict(self, state: Mapping[str, np.ndarray], hyper: dict | None = None
                        ) -> None:
        """Restore state tensors (and, given, `hyper()`'s dict); checks they fit first."""
        if hyper is not None and hyper.get("type") != type(self).__name__:
            raise TensorcError(f"optimizer state is for {hyper.get('type')!r}, not "
                               f"{type(self).__name__}")
        want = {f"{k}.{n}": (k, n) for k in self.STATE for n in self.names}
        missing = [s for s in want if s not in state]
        extra = [s for s in state if s not in want]
        if missing or extra:
            raise TensorcError(f"{type(self).__name__} state does not fit the parameters: "
                               + "; ".join(s for s in (
                                   f"missing {missing[:5]}" if missing else "",
                                   f"unexpected {extra[:5]}" if extra else "") if s))
        for s, (_, n) in want.items():
            a = np.asarray(state[s])
            if a.shape != self.params[n].shape:
                raise TensorcError(f"{type(self).__name__} state {s!r}: shape {list(a.shape)}, "
                                   f"the parameter's is {list(self.params[n].shape)}")
        if hyper is not None:
            saved = self.hyper()
            try:
                self._set_hyper(hyper)
            except (KeyError, TypeError, ValueError) as e:
                self._set_hyper(saved)
                raise TensorcError(f"bad {type(self).__name__} hyper-parameters {hyper}: "
                                   f"{e!r}") from None
        for s, (k, n) in want.items():
            np.copyto(self.state[k][n], np.asarray(state[s]), casting="same_kind")

    # -- subclass hooks --
    def _build(self, g: Graph, p, grad, state: dict, s: dict):
        raise NotImplementedError

    def _scalars(self) -> dict[str, float]:
        raise NotImplementedError


def _f32(x: float) -> np.float32:
    return np.float32(x)


class SGD(Optimizer):
    """torch.optim.SGD: with weight decay `g += wd * p`; with momentum the buffer is the
    first gradient, then `buf = momentum * buf + (1 - dampening) * g`, and the step
    direction is `buf` (nesterov: `g + momentum * buf`); `p -= lr * direction`."""

    SCALARS = ("neg_lr", "wd", "keep", "take", "mu")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, backend: str = "numpy"):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise TensorcError("nesterov momentum requires a momentum and zero dampening")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise TensorcError(f"SGD: invalid lr {lr}, momentum {momentum} or weight_decay "
                               f"{weight_decay}")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self.STATE = ("momentum",) if momentum else ()
        super().__init__(params, lr, backend)

    def hyper(self) -> dict:
        return {**super().hyper(), "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _set_hyper(self, hyper: dict) -> None:
        if bool(hyper["momentum"]) != bool(self.momentum):
            raise TensorcError("optimizer state: SGD with and without momentum differ in "
                               "their state; make the optimizer with the checkpoint's momentum")
        super()._set_hyper(hyper)
        self.momentum, self.dampening = float(hyper["momentum"]), float(hyper["dampening"])
        self.weight_decay, self.nesterov = float(hyper["weight_decay"]), bool(hyper["nesterov"])

    def _structure(self) -> tuple:
        return (bool(self.momentum), self.nesterov, bool(self.weight_decay))

    def _build(self, g, p, grad, state, s):
        d = grad
        if self.weight_decay:
            d = g.add("add", d, g.add("mul", s["wd"], p))
        new_state = {}
        if self.momentum:
            # torch: the first step's buffer is the gradient (keep = 0, take = 1), then
            # buf * momentum + (1 - dampening) * g
            buf = g.add("add", g.add("mul", state["momentum"], s["keep"]),
                        g.add("mul", s["take"], d))
            new_state["momentum"] = buf
            d = g.add("add", d, g.add("mul", s["mu"], buf)) if self.nesterov else buf
        return g.add("add", p, g.add("mul", s["neg_lr"], d)), new_state

    def _scalars(self):
        first = self.step_count == 1
        return {"neg_lr": _f32(-self.lr), "wd": _f32(self.weight_decay),
                "keep": _f32(0.0 if first else self.momentum),
                "take": _f32(1.0 if first else 1.0 - self.dampening), "mu": _f32(self.momentum)}


class AdamW(Optimizer):
    """torch.optim.AdamW: `p *= 1 - lr * wd`; `m = lerp(m, g, 1 - beta1)`;
    `v = v * beta2 + (1 - beta2) * g * g`; `p += -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`
    with the bias corrections `bc_i = 1 - beta_i ** step`."""

    STATE = ("exp_avg", "exp_avg_sq")
    SCALARS = ("decay", "w1", "w1c", "beta2", "w2", "bc2_sqrt", "eps", "neg_step_size")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, backend: str = "numpy"):
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or lr < 0 or eps < 0 or weight_decay < 0:
            raise TensorcError(f"AdamW: invalid lr {lr}, betas {betas}, eps {eps} or "
                               f"weight_decay {weight_decay}")
        self.betas, self.eps, self.weight_decay = (b1, b2), float(eps), float(weight_decay)
        super().__init__(params, lr, backend)

    def hyper(self) -> dict:
        return {**super().hyper(), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _set_hyper(self, hyper: dict) -> None:
        super()._set_hyper(hyper)
        self.betas = tuple(float(b) for b in hyper["betas"])
        self.eps, self.weight_decay = float(hyper["eps"]), float(hyper["weight_decay"])

    def _small_weight(self) -> bool:
        return bool(abs(_f32(1 - self.betas[0])) < 0.5)

    def _structure(self) -> tuple:
        return (self._small_weight(),)

    def _build(self, g, p, grad, state, s):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p = g.add("mul", p, s["decay"])
        # torch's lerp(m, g, w = 1 - beta1): m + w * (g - m) for w < 0.5, else
        # g - (g - m) * (1 - w)
        if self._small_weight():
            m = g.add("add", m, g.add("mul", s["w1"], g.add("sub", grad, m)))
        else:
            m = g.add("sub", grad, g.add("mul", g.add("sub", grad, m), s["w1c"]))
        # addcmul: v * beta2 + ((1 - beta2) * g) * g
        v = g.add("add", g.add("mul", v, s["beta2"]),
                  g.add("mul", g.add("mul", s["w2"], grad), grad))
        denom = g.add("add", g.add("div", g.add("sqrt", v), s["bc2_sqrt"]), s["eps"])
        # addcdiv: p + value * (m / denom)
        p = g.add("add", p, g.add("mul", s["neg_step_size"], g.add("div", m, denom)))
        return p, {"exp_avg": m, "exp_avg_sq": v}

    def _scalars(self):
        b1, b2 = self.betas
        n = self.step_count
        bc1, bc2 = 1 - b1 ** n, 1 - b2 ** n
        return {"decay": _f32(1 - self.lr * self.weight_decay), "w1": _f32(1 - b1),
                "w1c": np.float32(1) - _f32(1 - b1), "beta2": _f32(b2), "w2": _f32(1 - b2),
                "bc2_sqrt": _f32(bc2 ** 0.5), "eps": _f32(self.eps),
                "neg_step_size": _f32(-(self.lr / bc1))}


# --- gradients ----------------------------------------------------------------------------

def _sum_squares(a: np.ndarray, chunk: int = 1 << 16) -> float:
    """The sum of squares of a float array: float32 dot products (BLAS) over chunks,
    summed in float64 (relative error ~1e-8 on GPT-small's gradients; a float64 copy
    of each chunk first was ten times slower)."""
    flat = np.asarray(a).reshape(-1)
    total = 0.0
    for i in range(0, flat.size, chunk):
        x = flat[i:i + chunk]
        total += float(np.dot(x, x))
    return total


def sum_over_split(group, split: Mapping[str, np.ndarray]) -> Callable[[float], float]:
    """`clip_grad_norm`'s `sum_over` for gradients sharded over a communicator `group`:
    the squares of the `split` ones (each rank holding its slice) summed over the group,
    the others (alike on every rank of it) counted once."""
    mine = sum(_sum_squares(g) for g in split.values())
    return lambda s: s - mine + float(group.all_reduce(np.array(mine, np.float64)))


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float,
                   error_if_nonfinite: bool = False,
                   sum_over: Callable[[float], float] | None = None) -> float:
    """torch.nn.utils.clip_grad_norm_: the global L2 norm of all gradients (returned, as
    before clipping); where it exceeds `max_norm` every gradient is scaled in place by
    `max_norm / (norm + 1e-6)` (float32). Chunks' sums of squares add up in float64;
    `sum_over` adds the sums of the ranks holding the other shards of the gradients."""
    for n, g in grads.items():
        if not isinstance(g, np.ndarray) or not g.flags.writeable:
            raise TensorcError(f"gradient {n!r}: expected a writeable numpy array, got "
                               f"{type(g).__name__}")
    squares = sum(_sum_squares(g) for g in grads.values())
    norm = math.sqrt(sum_over(squares) if sum_over else squares)
    if not math.isfinite(norm):
        if error_if_nonfinite:
            raise TensorcError(f"the total gradient norm is {norm}")
    coef = max_norm / (norm + 1e-6)
    if not coef < 1.0 and math.isfinite(norm):
        return norm
    scale = np.float32(coef) if math.isfinite(coef) else np.float32(np.nan)
    with np.errstate(invalid="ignore"):   # inf * 0: nan, as torch's is
        for g in grads.values():
            g *= scale
    return norm


class GradAccumulator:
    """Sums gradients over micro-batches into persistent float32 buffers shaped like the
    parameters; `mean()` divides the sum by the number of micro-batches added (in place)
    and returns the buffers (valid until the next `add`, which starts a new sum)."""

    def __init__(self, params: Mapping[str, np.ndarray]):
        self.buffers = {n: np.zeros(np.shape(p), F32) for n, p in params.items()}
        self.count = 0
        self._done = False

    def add(self, grads: Mapping[str, np.ndarray]) -> None:
        if set(grads) != set(self.buffers):
            raise TensorcError("gradients do not match the accumulator's parameters: "
                               f"{sorted(set(grads) ^ set(self.buffers))[:5]}")
        for n, g in grads.items():   # all checked before any is added
            if np.shape(g) != self.buffers[n].shape:
                raise TensorcError(f"gradient {n!r}: shape {list(np.shape(g))}, expected "
                                   f"{list(self.buffers[n].shape)}")
        if self._done:   # the mean was taken: a new sum starts
            self.reset()
        for n, g in grads.items():
            b = self.buffers[n]
            if self.count == 0:
                np.copyto(b, g, casting="same_kind")
            else:
                np.add(b, g, out=b, casting="same_kind")
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise TensorcError("no gradients were accumulated")
        if not self._done:
            for b in self.buffers.values():
                b /= np.float32(self.count)
            self._done = True
        return self.buffers

    def reset(self) -> None:
        self.count, self._done = 0, False


# --- schedules ---------------------------------------------------------------------------

class Constant:
    """The same learning rate at every step."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def __call__(self, step: int) -> float:
        return self.lr

    def to_dict(self) -> dict:
        return {"type": "Constant", "lr": self.lr}

    @classmethod
    def from_dict(cls, d: dict) -> Constant:
        return cls(d["lr"])


class WarmupCosine:
    """Linear warmup from 0 to `base_lr` over `warmup_steps`, then a half cosine down to
    `min_lr` at `total_steps`, and `min_lr` after it. With min_lr = 0, transformers'
    get_cosine_schedule_with_warmup (up to total_steps; past it that one rises again)."""

    def __init__(self, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        if warmup_steps < 0 or total_steps < warmup_steps:
            raise TensorcError(f"WarmupCosine: need 0 <= warmup_steps ({warmup_steps}) <= "
                               f"total_steps ({total_steps})")
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / max(1, self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps)
                       / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi
                                                                               * progress))

    def to_dict(self) -> dict:
        return {"type": "WarmupCosine", "base_lr": self.base_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr": self.min_lr}

    @classmethod
    def from_dict(cls, d: dict) -> WarmupCosine:
        return cls(d["base_lr"], d["warmup_steps"], d["total_steps"], d.get("min_lr", 0.0))


SCHEDULES = {"Constant": Constant, "WarmupCosine": WarmupCosine}


def schedule_from_dict(d: dict):
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in SCHEDULES:
        raise TensorcError(f"unknown learning-rate schedule {kind!r} (known: "
                           f"{', '.join(SCHEDULES)})")
    try:
        return SCHEDULES[kind].from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise TensorcError(f"bad {kind} schedule {d}: {e}") from None


# --- checkpoints ---------------------------------------------------------------------------

MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE = "model.safetensors", "optimizer.safetensors", \
    "trainer.json"
_BIG = 1 << 53   # ints past this are strings in trainer.json: exact in any JSON reader


def _to_json(x):
    """An RNG state (ints, perhaps past 2**53; numpy arrays and scalars) as plain JSON."""
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return {"__ndarray__": _to_json(x.tolist()), "dtype": x.dtype.str}
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= _BIG:
        return {"__int__": str(x)}
    return x


def _from_json(x):
    if isinstance(x, dict):
        if set(x) == {"__int__"}:
            return int(x["__int__"])
        if set(x) == {"__ndarray__", "dtype"}:
            return np.array(_from_json(x["__ndarray__"]), dtype=np.dtype(x["dtype"]))
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


@dataclass
class Checkpoint:
    """What `load_checkpoint` read; `restore` puts it into a model and optimizer."""

    directory: str
    params: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    optimizer_hyper: dict | None
    step: int
    schedule: dict | None = None
    rng_state: dict | None = None
    extra: dict = field(default_factory=dict)

    def restore(self, params: Mapping[str, np.ndarray], optimizer: Optimizer | None = None,
                rng: np.random.Generator | None = None) -> None:
        """Copy the weights into `params` (in place), the state into `optimizer`, the RNG
        state into `rng`; everything is checked before anything is written."""
        where = f"checkpoint {self.directory}"
        missing = [n for n in params if n not in self.params]
        extra = [n for n in self.params if n not in params]
        if missing or extra:
            raise TensorcError(f"{where} does not fit the model: " + "; ".join(
                s for s in (f"missing {missing[:5]}" if missing else "",
                            f"unexpected {extra[:5]}" if extra else "") if s))
        for n, p in params.items():
            a = self.params[n]
            if a.shape != np.shape(p) or a.dtype != np.asarray(p).dtype:
                raise TensorcError(f"{where}: tensor {n!r} is {a.dtype}{list(a.shape)}, the "
                                   f"model's is {np.asarray(p).dtype}{list(np.shape(p))}")
        if rng is not None and self.rng_state is None:
            raise TensorcError(f"{where} holds no RNG state")
        if optimizer is not None:
            try:
                optimizer.load_state_dict(self.optimizer_state, self.optimizer_hyper)
            except TensorcError as e:
                raise TensorcError(f"{where}: {e}") from None
        for n, p in params.items():
            np.copyto(p, self.params[n])
        if rng is not None:
            rng.bit_generator.state = self.rng_state

    def make_schedule(self):
        return None if self.schedule is None else schedule_from_dict(self.schedule)

    def make_rng(self) -> np.random.Generator:
        """A fresh Generator continuing where the saved one was."""
        if self.rng_state is None:
            raise TensorcError(f"checkpoint {self.directory} holds no RNG state")
        kind = self.rng_state.get("bit_generator")
        bitgen = getattr(np.random, str(kind), None)
        if not (isinstance(bitgen, type) and issubclass(bitgen, np.random.BitGenerator)):
            raise TensorcError(f"checkpoint {self.directory}: unknown bit generator {kind!r}")
        rng = np.random.Generator(bitgen())
        rng.bit_generator.state = self.rng_state
        return rng


def save_checkpoint(directory: str, params: Mapping[str, np.ndarray],
                    optimizer: Optimizer | None, step: int, extra: dict | None = None, *,
                    schedule=None, rng: np.random.Generator | None = None) -> str:
    """Write a checkpoint folder: the weights, the optimizer state, and trainer.json.
    Written into a temporary folder beside `directory`, then renamed into place (an old
    checkpoint there is replaced only once the new one is complete). Returns the path."""
    from safetensors.numpy import save_file

    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        raise TensorcError(f"cannot write checkpoint {directory}: {parent} is not a directory")
    if os.path.lexists(directory) and (os.path.islink(directory)
                                       or not os.path.isdir(directory)):
        raise TensorcError(f"cannot write checkpoint {directory}: it exists and is not a "
                           "directory")
    trainer = {"format": 1, "step": int(step),
               "optimizer": optimizer.hyper() if optimizer is not None else None,
               "schedule": schedule.to_dict() if schedule is not None else None,
               "rng": _to_json(rng.bit_generator.state) if rng is not None else None,
               "extra": extra or {}}
    try:
        text = json.dumps(trainer, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TensorcError(f"checkpoint: trainer state is not JSON-able: {e}") from None
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        save_file({n: np.asarray(p, order="C") for n, p in params.items()},
                  os.path.join(tmp, MODEL_FILE))
        save_file(optimizer.state_dict() if optimizer is not None else {},
                  os.path.join(tmp, OPTIMIZER_FILE))
        with open(os.path.join(tmp, TRAINER_FILE), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's folder is private; a checkpoint is not
        for name in (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        old = None
        if os.path.isdir(directory):
            old = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old-", dir=parent)
            os.rename(directory, os.path.join(old, "ckpt"))
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint` (one-line TensorcError for a
    missing folder or file, or a corrupt one)."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TensorcError(f"checkpoint {directory}: no such directory")
    paths = {f: os.path.join(directory, f) for f in (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE)}
    for f, path in paths.items():
        if not os.path.isfile(path):
            raise TensorcError(f"checkpoint {directory}: missing {f}")
    try:
        with open(paths[TRAINER_FILE]) as fh:
            trainer = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorcError(f"checkpoint {directory}: {TRAINER_FILE} is not valid JSON "
                           f"({e})") from None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        raise TensorcError(f"checkpoint {directory}: {TRAINER_FILE} has no step count")
    tensors = {}
    for f in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            tensors[f] = load_file(paths[f])
        except Exception as e:   # safetensors raises its own error types
            raise TensorcError(f"checkpoint {directory}: cannot read {f}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                               ) from None
    return Checkpoint(directory=directory, params=tensors[MODEL_FILE],
                      optimizer_state=tensors[OPTIMIZER_FILE],
                      optimizer_hyper=trainer.get("optimizer"), step=trainer["step"],
                      schedule=trainer.get("schedule"),
                      rng_state=_from_json(trainer.get("rng")),
                      extra=trainer.get("extra") or {})
