"""Structured pruning as a workflow (`tensorc prune`): a model traced at symbolic
shapes, the `prune` pass (`passes/prune.py`), what it changed (params, FLOPs, held-out
quality) and recovery: the pruned graph trained as a model (`frontend.GraphModule`),
fine-tuned on its task's data or distilled from the unpruned model's logits."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .errors import TensorcError
from .ir import Graph

TASKS = ("clm", "mlm", "classify")   # what prune measures and recovers on


def symbolic_trace(model) -> Graph:
    """`model` traced with a symbolic batch (and sequence, for token inputs), so one
    graph serves calibration, training and evaluation batches."""
    from .loading import symbolic_trace as trace_symbolic
    return trace_symbolic(model, model.example_inputs())


@dataclasses.dataclass
class Source:
    """A built-in model or `tensorc train` checkpoint to prune: its module, graph and
    the task its quality is measured (and recovered) on."""
    module: object
    graph: Graph
    task: str
    name: str


def load(spec: str, preset: str | None = None, overrides: dict | None = None,
         task: str | None = None) -> Source:
    """A built-in model (on its default task's data) or a `tensorc train` checkpoint
    (on the task it was trained on), unless `task` says otherwise."""
    from .models import MODELS, get
    from .optim import TRAINER_FILE
    from .training import DEFAULT_TASKS, is_checkpoint, load_checkpoint_model, task_settings
    checkpoint = spec not in MODELS and is_checkpoint(spec)
    if spec not in MODELS and not checkpoint:
        raise TensorcError(f"prune takes a built-in model or a `tensorc train` checkpoint "
                           f"(its task gives the data to measure and recover on); got {spec}")
    if checkpoint and (preset or overrides):
        raise TensorcError("--preset and --set apply to built-in models, not checkpoints")
    if task is None and checkpoint:
        with open(os.path.join(spec, TRAINER_FILE)) as f:
            task = json.load(f).get("extra", {}).get("task")
    task = task or DEFAULT_TASKS.get(spec)
    if task not in TASKS:
        raise TensorcError(f"prune measures and recovers on {', '.join(TASKS)}; {spec} trains "
                           f"on {task}: give --task")
    model = load_checkpoint_model(spec) if checkpoint else \
        get(spec, preset or "tiny", **{**task_settings(task), **(overrides or {})})
    return Source(model, symbolic_trace(model), task, spec)


def size(graph: Graph, batch: int, seq: int) -> dict:
    """Parameters and forward FLOPs at batch x seq."""
    from .ops import get_op
    env = {"batch": batch, "seq": seq}
    return {"params": graph.param_count(),
            "flops": sum(get_op(n.op).count_flops(n, env) for n in graph.nodes)}


def _data(task: str, batch: int, seq: int, data_bytes: int, seed: int = 0):
    from .training import TaskData
    return TaskData(task, batch, seq, data_bytes, seed)


def evaluate(graph: Graph, task: str, seq: int = 128, data_bytes: int = 2_000_000,
             backend: str = "llvm", data=None) -> dict:
    """Held-out metrics (bits per byte, loss or accuracy) of a graph on its task: the
    held-out batches `tensorc train` evaluates with at batch 16 (16K tokens of text)."""
    from .frontend import GraphModule
    data = data or _data(task, 16, seq, data_bytes)
    return data.evaluate(GraphModule(graph), backend)


def calibration(task: str, batches: int = 4, batch: int = 8, seq: int = 128,
                data_bytes: int = 2_000_000, inputs=None) -> list[dict]:
    """Input batches (the task's model inputs only) for activation/taylor importance."""
    from .training import get_task
    data = _data(task, batch, seq, data_bytes, seed=1)
    rng = np.random.default_rng(1)
    keep = inputs or get_task(task).inputs
    return [{k: b[k] for k in keep} for b in (data.batch(rng) for _ in range(batches))]


def recover(pruned: Graph, teacher: Graph, task: str, steps: int, *, distill: bool = True,
            batch: int = 16, seq: int = 128, lr: float = 5e-4, warmup: int | None = None,
            data_bytes: int = 2_000_000, temperature: float = 1.0, alpha: float = 0.5,
            backend: str = "llvm", on_step=None) -> tuple[Graph, dict]:
    """Train the pruned graph's weights for `steps` (AdamW, warmup then cosine): on the
    task's labels, and with `distill` on the teacher graph's logits too (soft targets
    at `temperature`, weight `alpha`). Returns the trained graph and the last record
    with its held-out metrics."""
    from .backends import get_backend
    from .frontend import GraphModule
    from .optim import WarmupCosine
    from .passes import run_pipeline
    from .training import TrainConfig, TrainStep, get_task, make_optimizer, train_steps
    the_task = get_task(task)
    data = _data(task, batch, seq, data_bytes)
    model = GraphModule(pruned)
    teacher_exe = get_backend(backend).compile(run_pipeline(teacher, "O2")) if distill \
        else None
    rng = np.random.default_rng(0)

    def batches():
        while True:
            b = data.batch(rng)
            if teacher_exe is not None:
                b["teacher_logits"] = teacher_exe(*[b[k] for k in the_task.inputs])
                if isinstance(b["teacher_logits"], (tuple, list)):
                    b["teacher_logits"] = b["teacher_logits"][0]
            yield b
    stream = batches()
    first = next(stream)
    cfg = TrainConfig(steps=steps, lr=lr, warmup=steps // 10 if warmup is None else warmup)
    step = TrainStep(model, the_task, first, backend,
                     {"temperature": temperature, "alpha": alpha} if distill else None)
    opt = make_optimizer(step.params, cfg, backend)
    record: dict = {}
    for record in train_steps(step, opt, WarmupCosine(lr, cfg.warmup, steps), stream, cfg):
        if on_step:
            on_step(record)
    trained = model.graph()
    record.update(evaluate(trained, task, seq, data_bytes, backend))
    return trained, record


def importance_table(scores: dict) -> str:
    """`passes.prune.importance`'s scores as text: per layer its heads' scores, its
    neurons' spread and its own score, then the heads from least to most important."""
    lines = ["layer  heads (importance, each)" + " " * 20 + "ffn min / mean / max   layer"]
    for i, heads in enumerate(scores["heads"]):
        ffn = scores["ffn"][i] if i < len(scores["ffn"]) else np.array([np.nan])
        layer = scores["layers"][i] if i < len(scores["layers"]) else np.nan
        lines.append(f"{i:5d}  " + " ".join(f"{h:.3g}" for h in heads).ljust(44)
                     + f"{np.min(ffn):.3g} / {np.mean(ffn):.3g} / {np.max(ffn):.3g}"
                     + f"   {layer:.3g}")
    order = sorted((float(h), i, j) for i, hs in enumerate(scores["heads"])
                   for j, h in enumerate(hs))
    lines.append("least important heads (layer.head): "
                 + ", ".join(f"{i}.{j}" for _, i, j in order[:12]))
    return "\n".join(lines) + "\n"


def importance_heatmap(scores: dict, path: str, title: str) -> None:
    """A layers x heads heat map of head importance (PNG; matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    heads = scores["heads"]
    grid = np.full((len(heads), max(len(h) for h in heads)), np.nan)
    for i, h in enumerate(heads):
        grid[i, :len(h)] = h
    fig, ax = plt.subplots(figsize=(1 + 0.6 * grid.shape[1], 1 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
