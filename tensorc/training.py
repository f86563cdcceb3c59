"""Training: a model and a task traced into one forward + backward graph, compiled once
and called per step; the optimizer (`optim.py`) updates the weights in place.

A task says which batch a model reads and how its loss is computed (`TASKS`). The
weights become graph inputs before any pass runs, so no pass folds them into
constants and one compiled step serves every update. The step graph is the loss
graph with `grad` applied (`passes/autodiff.py`), then the O2 fusion passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from .errors import TensorcError
from .frontend import F, Module, trace
from .passes import run_pipeline
from .passes.autodiff import GRAD_PREFIX, as_inputs, grad

DROPOUT_SEED = "dropout_seed"   # the step's input that seeds its dropout masks, when it has one
# Before grad: what makes a good forward (attention fused, so its backward is the fused
# attention_grad); after: the usual fusion over forward and backward together.
FORWARD_PASSES = "O1,fuse-patterns,fuse-attention"
STEP_PASSES = "O2"
# The tracer is one per process (`Tracer.current`): ranks that are threads take turns.
_TRACING = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Task:
    """`loss(model, batch)` -> a scalar loss tensor; `inputs`: the batch keys the model
    reads; the rest of the batch (labels) only the loss."""

    name: str
    inputs: tuple[str, ...]

    def logits(self, model, batch):
        return model(*[batch[k] for k in self.inputs])

    def loss(self, model, batch, teacher_logits=None, temperature=1.0, alpha=0.5):
        logits = self.logits(model, batch)
        hard = F.cross_entropy(logits, batch["labels"])
        if teacher_logits is None:
            return hard
        soft = F.soft_cross_entropy(logits, teacher_logits, temperature)
        return soft * alpha + hard * (1.0 - alpha)


TASKS = {t.name: t for t in (
    Task("clm", ("input_ids",)),                      # next byte (gpt, llama)
    Task("mlm", ("input_ids", "attention_mask")),     # masked bytes, 80/10/10 (bert)
    Task("classify", ("pixel_values",)),              # 8x8 digits (vit)
    Task("translate", ("src_ids", "tgt_ids")),        # dates, two formats (transformer)
)}


# The task a built-in model trains on unless told otherwise (train, distill, prune).
DEFAULT_TASKS = {"gpt": "clm", "llama": "clm", "bert": "mlm", "vit": "classify",
                 "transformer": "translate"}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TensorcError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def example_batch(model: Module, task: str, batch: int = 1, seq: int | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """The model's example inputs plus random labels the task's loss reads."""
    inputs = model.example_inputs(batch=batch, seq=seq, seed=seed)
    rng = np.random.default_rng(seed)
    n = model.config.vocab_size
    if task == "classify":
        labels = rng.integers(0, n, batch)
    else:
        labels = rng.integers(0, n, inputs["tgt_ids" if task == "translate" else "input_ids"]
                              .shape)
    return {**{k: inputs[k] for k in get_task(task).inputs}, "labels": labels}


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
        seed = batch.pop(DROPOUT_SEED, None)   # dropout drops only while a step is traced
        with F.dropout_seed(seed) if seed is not None else contextlib.nullcontext():
            return {"loss": self._task.loss(self._model, batch, teacher,
                                            **(self._distill or {}))}


def loss_graph(model: Module, task: Task, batch: dict[str, np.ndarray],
               distill: dict | None = None):
    """The traced loss (inputs: the batch; output `loss`) and the weights' names."""
    takes = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.default is inspect.Parameter.empty]
    if takes != list(task.inputs):
        raise TensorcError(f"task {task.name} feeds {', '.join(task.inputs)}, but "
                           f"{type(model).__name__} takes {', '.join(takes)}")
    with _TRACING:
        graph = trace(_WithLoss(model, task, distill), **batch)
    names = [n for n, _ in model.named_parameters()]
    return graph, names


def step_graph(model: Module, task: Task, batch: dict[str, np.ndarray],
               distill: dict | None = None, passes: str = STEP_PASSES,
               recompute: bool = False, qat: bool = False):
    """The training step graph: loss and ``grad.<weight>`` for every parameter;
    `recompute`: cheap activations computed again in the backward, not kept; `qat`:
    quantization-aware, the forward computing its matmuls as `quantize` (dynamic, int8)
    will (`quantize:mode=qdq`: fake-quantized weights and rows, straight-through
    gradients), the logits head in float as there."""
    graph, names = loss_graph(model, task, batch, distill)
    graph = run_pipeline(as_inputs(graph, names), FORWARD_PASSES)
    if qat:
        graph = run_pipeline(graph, "quantize:mode=qdq:skip=" + _head_weights(model, task, batch))
    graph = grad(graph, "loss", names, recompute=recompute)
    # CSE would merge each recomputed activation back into the one it repeats
    return run_pipeline(graph, passes, disable=("cse",) if recompute else ()), names


def _head_weights(model: Module, task: Task, batch) -> str:
    """The logits head's weight names in the inference graph, as a quantize skip list."""
    from .passes.quantize import heads, weight_name
    forward = run_pipeline(trace(model, **{k: batch[k] for k in task.inputs}), "O1")
    return "+".join(weight_name(n.inputs[1]) for n in heads(forward))


class TrainStep:
    """One compiled forward + backward: `step(batch)` -> (loss, {name: gradient}),
    reading the model's parameter arrays (which the optimizer updates in place);
    `rewrite` changes the step graph before it compiles (`parallel.data_parallel`). The
    gradients are written into the same arrays every call (no 4 bytes per weight
    allocated and faulted in per step): the next call overwrites them."""

    def __init__(self, model: Module, task: Task, batch: dict[str, np.ndarray],
                 backend: str = "llvm", distill: dict | None = None,
                 recompute: bool = False, qat: bool = False, rewrite: Callable | None = None):
        from .backends import get_backend
        self.graph, self.names = step_graph(model, task, batch, distill, recompute=recompute,
                                            qat=qat)
        if rewrite is not None:   # (graph, names) -> (graph, gradient names): data parallel
            self.graph, self.names = rewrite(self.graph, self.names)
        self.exe = get_backend(backend).compile(self.graph)
        self.params = {n: p.data for n, p in model.named_parameters()}
        for n, a in self.params.items():
            if not (a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32):
                self.params[n] = np.ascontiguousarray(a, np.float32)
        for n, p in model.named_parameters():
            p.data = self.params[n]   # one array per weight, shared with the optimizer
        self.batch_names = [v.name for v in self.graph.inputs if v.name not in self.params]
        self._out: tuple | None = None   # (batch shapes, the output arrays written last)

    def __call__(self, batch: dict[str, np.ndarray]):
        feeds = {n: batch[n] for n in self.batch_names}
        shapes = tuple(np.shape(a) for a in feeds.values())
        feeds.update(self.params)
        reuse = self._out is not None and self._out[0] == shapes
        out = self.exe.run(feeds, out=self._out[1] if reuse else None)
        self._out = (shapes, out)
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
    recompute: bool = False
    qat: bool = False   # quantization-aware: run the result with --passes O2,quantize


def make_optimizer(params, cfg: TrainConfig, backend: str):
    from . import optim
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=backend)
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                         backend=backend)
    raise TensorcError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")


def train_steps(step: TrainStep, optimizer, schedule: Callable[[int], float],
                batches: Iterator[dict], cfg: TrainConfig, start: int = 0,
                clip: Callable | None = None):
    """Run steps start..cfg.steps-1; yields one record per step (step, loss, lr,
    grad_norm, step_ms). Accumulation averages `cfg.accumulate` micro-batches; `clip`
    (default optim.clip_grad_norm) clips the gradients to `cfg.clip`."""
    from .optim import GradAccumulator, clip_grad_norm
    clip = clip or clip_grad_norm
    acc = None
    for i in range(start, cfg.steps):
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(cfg.accumulate):
            loss, grads = step(next(batches))
            total += loss
            if cfg.accumulate > 1:
                if acc is None:   # shaped like the step's gradients (ZeRO: its slices)
                    acc = GradAccumulator(grads)
                acc.add(grads)
        if acc is not None:
            grads = acc.mean()
        norm = clip(grads, cfg.clip) if cfg.clip else float("nan")
        lr = schedule(i)
        optimizer.step(grads, lr=lr)
        loss = total / cfg.accumulate
        if not math.isfinite(loss):
            raise TensorcError(f"step {i}: the loss is {loss}; lower --lr or check the data")
        yield {"step": i + 1, "loss": loss, "lr": lr, "grad_norm": norm,
               "step_ms": (time.perf_counter() - t0) * 1e3}


# --- data per task -----------------------------------------------------------------------

def task_settings(task: str) -> dict:
    """The config values a built-in model needs for a task's data (vocabulary, image
    shape): what `fit` and `tensorc prune` set on it."""
    from . import data
    if task == "classify":
        return {"vocab_size": 10, "image_size": 8, "patch_size": 2, "channels": 1}
    return {"vocab_size": {"clm": data.EOS_ID + 1, "mlm": data.MLM_VOCAB}.get(
        task, data.TRANSLATION_VOCAB)}


class TaskData:
    """Batches for training and a held-out evaluation, per task: `batch(rng)`,
    `evaluate(model, backend)` -> metrics, and the vocabulary the model needs."""

    def __init__(self, task: str, batch: int, seq: int, data_bytes: int | None, seed: int = 0,
                 path: str | None = None):
        from . import data
        self.task, self.size, self.seq = task, batch, seq
        self.report: list[str] = []
        if path is not None and task not in ("clm", "mlm"):
            raise TensorcError(f"--data takes text, for clm and mlm; {task} uses its "
                               "bundled data")
        if task in ("clm", "mlm"):
            corpus = data.text_corpus(path, max_bytes=data_bytes, seed=seed)
            self.train, self.val = corpus.train, corpus.val
            self.report = corpus.report.lines()
            self.vocab = data.EOS_ID + 1 if task == "clm" else data.MLM_VOCAB
        elif task == "classify":
            d = data.digits(seed=seed)
            self.train, self.val = (d["train_images"], d["train_labels"]), \
                (d["val_images"], d["val_labels"])
            self.vocab = 10
        else:
            self.pairs = data.translation_pairs(4000, seed=seed)
            self.val_pairs = data.translation_pairs(200, seed=seed + 10_000)
            self.vocab = data.TRANSLATION_VOCAB
            self.src_len, self.tgt_len = 12, 28

    def model_settings(self) -> dict:
        """--set values the task needs (vocabulary, image shape, lengths)."""
        return task_settings(self.task)

    def batch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        from . import data
        if self.task == "clm":
            return data.clm_batch(self.train, self.size, self.seq, rng)
        if self.task == "mlm":
            return data.mlm_batch(self.train, self.size, self.seq, rng)
        if self.task == "classify":
            return data.image_batch(*self.train, self.size, rng)
        return data.translation_batch(self.pairs, self.size, self.src_len, self.tgt_len, rng)

    def evaluate(self, model: Module, backend: str, max_batches: int = 8) -> dict[str, float]:
        """Held-out metrics of the model's current weights (each evaluation graph is
        compiled once, with the weights as inputs, and fed the weights of the moment)."""
        from . import data
        if self.task in ("clm", "mlm"):
            rng = np.random.default_rng(1234)   # the same held-out batches every time
            batches = list(itertools.islice(data.clm_eval_batches(self.val, self.size,
                                                                  self.seq), max_batches)) \
                if self.task == "clm" else \
                [data.mlm_batch(self.val, self.size, self.seq, rng) for _ in range(max_batches)]
            run = self._compiled("loss", model, backend, lambda: loss_graph(
                model, get_task(self.task), batches[0])[0])
            loss = float(np.mean([run(b)["loss"] for b in batches]))
            out = {"val_loss": loss}
            if self.task == "clm":
                out["bits_per_byte"] = loss / math.log(2)
            return out
        if self.task == "classify":
            images, labels = self.val
            run = self._compiled("logits", model, backend,
                                 lambda: trace(model, pixel_values=images))
            logits = next(iter(run({"pixel_values": images}).values()))
            return {"val_accuracy": float(np.mean(np.argmax(logits, -1) == labels))}
        src = data.encode_sources([s for s, _ in self.val_pairs], self.src_len)
        tgt = np.full((len(src), self.tgt_len), data.PAD_ID, np.int64)
        run = self._compiled("decode", model, backend,
                             lambda: trace(model, src_ids=src, tgt_ids=tgt))
        return {"bleu": translation_bleu(lambda s, t: next(iter(run(
            {"src_ids": s, "tgt_ids": t}).values())), src, self.tgt_len,
            [t for _, t in self.val_pairs])}

    def _compiled(self, key, model, backend, make_graph):
        """A run(feeds) -> outputs of `make_graph()` at O2 with the model's weights as
        inputs, compiled on first use."""
        from .backends import get_backend
        cache = self.__dict__.setdefault("_exes", {})
        names = [n for n, _ in model.named_parameters()]
        if key not in cache:
            graph = run_pipeline(as_inputs(make_graph(), names), "O2")
            cache[key] = get_backend(backend).compile(graph)
        exe = cache[key]
        return lambda feeds: exe.run({**feeds, **{n: p.data for n, p in
                                                  model.named_parameters()}})


def translation_bleu(logits, src: np.ndarray, tgt_len: int, references: list[str]) -> float:
    """Greedy decoding of every source with `logits(src, tgt)` (the decoder is causal,
    so one fixed-length forward per generated position), scored against the
    references."""
    from . import data
    tgt = np.full((len(src), tgt_len), data.PAD_ID, np.int64)
    tgt[:, 0] = data.BOS_ID
    for i in range(tgt_len - 1):
        tgt[:, i + 1] = np.argmax(logits(src, tgt)[:, i], -1)
    return data.bleu([data.decode_target(row[1:]) for row in tgt], references)


# --- the run: steps, evaluation, checkpoints ----------------------------------------------

@dataclasses.dataclass
class Run:
    """What `fit` needs beyond the step settings."""

    model: str                      # a built-in name
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)
    task: str = "clm"
    batch: int = 8
    seq: int = 64
    data_bytes: int | None = 2_000_000
    data: str | None = None         # text for clm/mlm (a file or folder); None: the stdlib
    backend: str = "llvm"
    out: str | None = None          # checkpoint directory
    eval_every: int = 0
    teacher: str | None = None      # a checkpoint directory: distil from it
    init: str | None = None         # a checkpoint directory: start from its weights
    temperature: float = 1.0
    alpha: float = 0.5


def fit(run: Run, cfg: TrainConfig, resume: str | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_data: Callable[[list[str]], None] | None = None, parallel=None) -> dict:
    """Train; returns the last record, with the evaluation's metrics. With `resume` the
    weights, optimizer state, schedule position and data RNG continue from that
    checkpoint, so the run continues as if never stopped. `on_data` gets the data
    cleaning report's lines (text tasks). `parallel`: this rank's strategy on a mesh
    (`parallel.strategy`: data, tensor or pipeline parallel); every rank draws the same
    batches of `run.batch` rows and trains on its share, and rank 0 evaluates and writes
    the whole model."""
    par = parallel
    from . import optim
    from .models import get
    task = get_task(run.task)
    if run.out:
        os.makedirs(os.path.dirname(os.path.abspath(run.out)), exist_ok=True)
    td = TaskData(run.task, run.batch, run.seq, run.data_bytes, cfg.seed, run.data)
    if on_data and td.report:
        on_data(td.report)
    overrides = {**td.model_settings(), **run.overrides}
    preset, weights = run.preset, None
    if run.init:   # fine-tuning: the checkpoint's model and weights, a fresh optimizer
        ck = optim.load_checkpoint(run.init)
        if ck.extra.get("model") != run.model:
            raise TensorcError(f"--init {run.init} holds a {ck.extra.get('model')} model, "
                               f"not {run.model}")
        preset, weights = ck.extra.get("preset", preset), ck.params
        overrides = {**td.model_settings(), **ck.extra.get("overrides", {}), **run.overrides}
    model = get(run.model, preset, seed=cfg.seed, **overrides)
    if weights is not None:
        model.load_state_dict(weights)
    rng = np.random.default_rng(cfg.seed)
    schedule = optim.WarmupCosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
    teacher = _teacher(run) if run.teacher else None
    first = td.batch(np.random.default_rng(cfg.seed))
    if model.config.dropout:
        first[DROPOUT_SEED] = np.array(0, np.int64)
    if teacher:
        first["teacher_logits"] = teacher(first)
    distill = {"temperature": run.temperature, "alpha": run.alpha} if teacher else None
    make_step = TrainStep
    if par:
        first, make_step = par.shard(first), par.step
    step = make_step(model, task, first, run.backend, distill, cfg.recompute, cfg.qat)
    opt = par.optimizer(step.params, lambda p: make_optimizer(p, cfg, run.backend)) if par \
        else make_optimizer(step.params, cfg, run.backend)
    start = 0
    if resume:
        ck = optim.load_checkpoint(resume)
        if par:   # this rank's part of the whole checkpoint
            par.restore(ck, step.params, opt, rng)
        else:
            ck.restore(step.params, opt, rng)
        start = ck.step
    meta = {"model": run.model, "preset": preset, "overrides": overrides,
            "task": run.task, "config": dataclasses.asdict(cfg)}

    def batches():
        while True:
            b = td.batch(rng)
            if model.config.dropout:   # a new mask every step, from the run's one RNG
                b[DROPOUT_SEED] = np.array(rng.integers(0, 2**31 - 1), np.int64)
            if teacher:
                b["teacher_logits"] = teacher(b)
            yield par.shard(b) if par else b
    record: dict = {"step": start}
    save = par.save_checkpoint if par else optim.save_checkpoint
    for record in train_steps(step, opt, schedule, batches(), cfg, start,
                              clip=par and par.clip_grad_norm):
        record["tokens_per_s"] = run.batch * (run.seq if run.task != "classify" else 1) \
            * cfg.accumulate / (record["step_ms"] / 1e3)
        due = record["step"] == cfg.steps or (run.eval_every
                                               and record["step"] % run.eval_every == 0)
        if due:   # with a mesh every rank gathers; the writer's model is then whole
            params = par.gather(model, step.params) if par else step.params
            if par is None or par.writer:
                record.update(td.evaluate(model, run.backend))
            if run.out:
                save(run.out, params, opt, record["step"],
                     {**meta, "metrics": {k: v for k, v in record.items()
                                          if isinstance(v, float)}},
                     schedule=schedule, rng=rng)
        if on_step:
            on_step(record)
    return record


def _teacher(run: Run):
    """The teacher's logits for a batch: its checkpoint loaded and compiled once."""
    from .backends import get_backend
    model = load_checkpoint_model(run.teacher)
    task = get_task(run.task)
    exe = None

    def logits(batch):
        nonlocal exe
        inputs = {k: batch[k] for k in task.inputs}
        if exe is None:
            graph = trace(model, **inputs)
            exe = get_backend(run.backend).compile(run_pipeline(graph, "O2"))
        return exe.run(inputs)[exe.output_names[0]]
    return logits


def is_checkpoint(path: str) -> bool:
    """A directory `tensorc train -o` wrote."""
    from .optim import TRAINER_FILE
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, TRAINER_FILE))


def load_checkpoint_model(directory: str) -> Module:
    """The built-in model a `tensorc train` checkpoint holds, with its trained weights."""
    from . import optim
    from .models import get
    ck = optim.load_checkpoint(directory)
    meta = ck.extra
    if "model" not in meta:
        raise TensorcError(f"{directory}: trainer.json names no model; not a tensorc train "
                           "checkpoint")
    model = get(meta["model"], meta.get("preset", "tiny"), **meta.get("overrides", {}))
    return model.load_state_dict(ck.params)


def plot_losses(records: list[dict], path: str) -> None:
    """Training loss per step (and validation where measured) as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TensorcError("the loss plot needs matplotlib: pip install 'tensorc[train]'") \
            from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
