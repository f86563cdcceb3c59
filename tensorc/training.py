"""Training: a model and a task traced into one forward + backward graph, compiled once
and called per step; the optimizer (`optim.py`) updates the weights in place.

A task says which batch a model reads and how its loss is computed (`TASKS`). The
weights become graph inputs before any pass runs, so no pass folds them into
constants and one compiled step serves every update. The step graph is the loss
graph with `grad` applied (`passes/autodiff.py`), then the O2 fusion passes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import numpy as np

from .errors import TensorcError
from .frontend import F, Module, trace
from .passes import run_pipeline
from .passes.autodiff import GRAD_PREFIX, grad

# Before grad: what makes a good forward (attention fused, so its backward is the fused
# attention_grad); after: the usual fusion over forward and backward together.
FORWARD_PASSES = "O1,fuse-patterns,fuse-attention"
STEP_PASSES = "O2"


@dataclasses.dataclass(frozen=True)
class Task:
    """`loss(model, batch)` -> a scalar loss tensor; `inputs`: the batch keys the model
    reads; the rest of the batch (labels) only the loss."""

    name: str
    inputs: tuple[str, ...]
    doc: str

    def logits(self, model, batch):
        return model(*[batch[k] for k in self.inputs])

    def loss(self, model, batch, teacher_logits=None, temperature=2.0, alpha=0.5):
        logits = self.logits(model, batch)
        hard = F.cross_entropy(logits, batch["labels"])
        if teacher_logits is None:
            return hard
        soft = F.soft_cross_entropy(logits, teacher_logits, temperature)
        return soft * alpha + hard * (1.0 - alpha)


TASKS = {t.name: t for t in (
    Task("clm", ("input_ids",), "next-byte prediction (gpt, llama)"),
    Task("mlm", ("input_ids", "attention_mask"), "masked bytes, 80/10/10 (bert)"),
    Task("classify", ("pixel_values",), "image classes (vit on 8x8 digits)"),
    Task("translate", ("src_ids", "tgt_ids"), "dates between two formats (transformer)"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TensorcError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


class _WithLoss(Module):
    """The model's forward plus its loss, its weights under their own names."""

    def __init__(self, model: Module, task: Task, distill: dict | None):
        super().__init__()
        self._children.update(model._children)   # the same tensors, the same names
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_distill", distill)

    def forward(self, **batch):
        teacher = batch.pop("teacher_logits", None)
        return {"loss": self._task.loss(self._model, batch, teacher, **(self._distill or {}))}


def loss_graph(model: Module, task: Task, batch: dict[str, np.ndarray],
               distill: dict | None = None):
    """The traced loss: inputs the batch (and the weights, as inputs), output `loss`."""
    graph = trace(_WithLoss(model, task, distill), **batch)
    names = [n for n, _ in model.named_parameters()]
    return graph, names


def step_graph(model: Module, task: Task, batch: dict[str, np.ndarray],
               distill: dict | None = None, passes: str = STEP_PASSES):
    """The training step graph: loss and ``grad.<weight>`` for every parameter."""
    graph, names = loss_graph(model, task, batch, distill)
    graph = grad(run_pipeline(lift_weights(graph, names), FORWARD_PASSES), "loss", names)
    return run_pipeline(graph, passes), names


def lift_weights(graph, names):
    """The graph with the weights `names` as inputs (grad would lift them too, but only
    after the forward passes had folded them)."""
    from .passes.autodiff import as_inputs
    return as_inputs(graph, names)


class TrainStep:
    """One compiled forward + backward: `step(batch)` -> (loss, {name: gradient}),
    reading the model's parameter arrays (which the optimizer updates in place)."""

    def __init__(self, model: Module, task: Task, batch: dict[str, np.ndarray],
                 backend: str = "llvm", distill: dict | None = None):
        from .backends import get_backend
        self.graph, self.names = step_graph(model, task, batch, distill)
        self.exe = get_backend(backend).compile(self.graph)
        self.params = {n: p.data for n, p in model.named_parameters()}
        for n, a in self.params.items():
            if not (a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32):
                self.params[n] = np.ascontiguousarray(a, np.float32)
        for n, p in model.named_parameters():
            p.data = self.params[n]   # one array per weight, shared with the optimizer
        self.batch_names = [v.name for v in self.graph.inputs if v.name not in self.params]

    def __call__(self, batch: dict[str, np.ndarray]):
        feeds = {n: batch[n] for n in self.batch_names}
        feeds.update(self.params)
        out = self.exe.run(feeds)
        return float(out["loss"]), {n: out[GRAD_PREFIX + n] for n in self.names}


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 10
    min_lr: float = 0.0
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    clip: float | None = 1.0
    accumulate: int = 1
    seed: int = 0


def make_optimizer(params, cfg: TrainConfig, backend: str):
    from . import optim
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=backend)
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                         backend=backend)
    raise TensorcError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")


def train_steps(step: TrainStep, optimizer, schedule: Callable[[int], float],
                batches: Iterator[dict], cfg: TrainConfig, start: int = 0):
    """Run steps start..cfg.steps-1; yields one record per step (step, loss, lr,
    grad_norm, step_ms). Accumulation averages `cfg.accumulate` micro-batches."""
    from .optim import clip_grad_norm
    for i in range(start, cfg.steps):
        t0 = time.perf_counter()
        total, grads = 0.0, None
        for _ in range(cfg.accumulate):
            loss, g = step(next(batches))
            total += loss
            if grads is None:
                grads = {n: a.copy() for n, a in g.items()} if cfg.accumulate > 1 else g
            else:
                for n, a in g.items():
                    grads[n] += a
        if cfg.accumulate > 1:
            for a in grads.values():
                a *= 1.0 / cfg.accumulate
        norm = clip_grad_norm(grads, cfg.clip) if cfg.clip else float("nan")
        lr = schedule(i)
        optimizer.step(grads, lr=lr)
        loss = total / cfg.accumulate
        if not math.isfinite(loss):
            raise TensorcError(f"step {i}: the loss is {loss}; lower --lr or check the data")
        yield {"step": i + 1, "loss": loss, "lr": lr, "grad_norm": norm,
               "step_ms": (time.perf_counter() - t0) * 1e3}
