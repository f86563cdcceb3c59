"""Key/value caches: how one model definition becomes a decode step.

A decoder generating text runs its prompt once (prefill), then one token at a time
(decode), each step attending to the keys and values of every earlier token. Both are
one traced graph, `decoder_step(model)`: its inputs are the new tokens, `start` (how
many tokens each batch row has cached already) and, per attention layer, a key and a
value cache of a fixed length L; its outputs are the logits of the new tokens and the
caches with the new rows written (`tensor_scatter`). The current length is data
(`start`), not a shape, so a generation compiles two programs whatever its length,
prefill and decode: attention reads all L cache rows and a mask hides those not
written yet.

Batch rows may hold prompts of different lengths: prompts are right-padded, every row
starts at 0, and a row's padding writes rows its later tokens overwrite before any
query can see them (query i of row b sees keys j <= start[b] + i).

A model supports caching when its forward takes `cache=None` and, given a `KVCache`,
passes `cache.positions` to its position encoding and `cache.layer(i)` to attention
layer i (see `models/gpt.py` and `models/llama.py`).
"""

from __future__ import annotations

from tensorc.errors import TensorcError
from tensorc.ir import Graph, TensorType

from . import functional as F
from .module import Module
from .tensor import Tensor
from .trace import trace

START = "start"


def key_name(layer: int, updated: bool = False) -> str:
    """Cache inputs are past.*, the updated caches the step returns present.* (the names
    Hugging Face exports use)."""
    return f"{'present' if updated else 'past'}.key.{layer}"


def value_name(layer: int, updated: bool = False) -> str:
    return f"{'present' if updated else 'past'}.value.{layer}"


class LayerCache:
    """One attention layer's view of the cache."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def positions(self) -> Tensor:
        return self.cache.positions

    @property
    def mask(self) -> Tensor:
        """bool [b, 1, t, L]: key j is visible to new token i."""
        return self.cache.mask

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys and values [b, hk, t, d]; returns the whole cache
        [b, hk, L, d] to attend over."""
        c, i = self.cache, self.index
        if c.new_keys[i] is not None:
            raise TensorcError(f"attention layer {i} updated the cache twice")
        c.new_keys[i] = F.tensor_scatter(c.keys[i], k, c.start, axis=2)
        c.new_values[i] = F.tensor_scatter(c.values[i], v, c.start, axis=2)
        return c.new_keys[i], c.new_values[i]


class KVCache:
    """The cache inputs of a traced step: `start` i64 [b] and per layer a key and a value
    cache [b, hk, L, d]; `t` is the number of new tokens."""

    def __init__(self, start: Tensor, keys: list[Tensor], values: list[Tensor], t):
        self.start, self.keys, self.values = start, keys, values
        self.new_keys: list[Tensor | None] = [None] * len(keys)
        self.new_values: list[Tensor | None] = [None] * len(values)
        length = keys[0].shape[2]
        self.positions = F.unsqueeze(start, 1) + F.unsqueeze(F.arange(t), 0)   # [b, t]
        visible = F.unsqueeze(F.unsqueeze(F.arange(length), 0), 0) \
            <= F.unsqueeze(self.positions, 2)                                  # [b, t, L]
        self.mask = F.unsqueeze(visible, 1)                                     # [b, 1, t, L]

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def outputs(self) -> dict[str, Tensor]:
        missing = [i for i, k in enumerate(self.new_keys) if k is None]
        if missing:
            raise TensorcError(f"attention layers {missing} never used their cache: does "
                               "the model pass cache.layer(i) to every attention layer?")
        out = {}
        for i, (k, v) in enumerate(zip(self.new_keys, self.new_values, strict=True)):
            out[key_name(i, True)], out[value_name(i, True)] = k, v
        return out


def cache_shape(model: Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a model that supports caching."""
    if not hasattr(model, "cache_layout"):
        raise TensorcError(f"{type(model).__name__} does not support a key/value cache")
    return model.cache_layout()


def decoder_step(model: Module, dtype: str = "f32") -> Graph:
    """The model's cached step as a graph: inputs input_ids i64[batch, seq], start
    i64[batch] and the caches past.key.i / past.value.i f32[batch, hk, cache_len, d];
    outputs the logits and the updated caches present.key.i / present.value.i."""
    layers, heads, d = cache_shape(model)
    cache_type = TensorType(("batch", heads, "cache_len", d), dtype)
    inputs = {"input_ids": TensorType(("batch", "seq"), "i64"),
              START: TensorType(("batch",), "i64")}
    for i in range(layers):
        inputs[key_name(i)] = inputs[value_name(i)] = cache_type

    graph = trace(_Step(model, layers), **inputs)
    graph.name = type(model).__name__.lower() + "_step"
    return graph


def is_decoder_step(graph: Graph) -> bool:
    """Whether `graph` has the interface `decoder_step` gives (traced here, or imported
    from an ONNX file it was exported to)."""
    names = [v.name for v in graph.inputs]
    layers = (len(names) - 2) // 2
    return (len(names) >= 4 and names[:2] == ["input_ids", START]
            and names[2:] == [n for i in range(layers) for n in (key_name(i), value_name(i))]
            and [v.name for v in graph.outputs[1:]]
            == [n for i in range(layers) for n in (key_name(i, True), value_name(i, True))])


class _Step(Module):
    """The model's forward with a cache, traced under the model's own weight names."""

    def __init__(self, model: Module, layers: int):
        super().__init__()
        object.__setattr__(self, "model", model)   # not a submodule: no name prefix
        self.layers = layers

    def named_tensors(self, prefix: str = ""):
        return self.model.named_tensors(prefix)

    def forward(self, **x):
        n = self.layers
        cache = KVCache(x[START], [x[key_name(i)] for i in range(n)],
                        [x[value_name(i)] for i in range(n)], x["input_ids"].shape[1])
        logits = self.model(x["input_ids"], cache=cache)
        return {self.model.output_names[0]: logits, **cache.outputs()}
