"""Layers of the model DSL: the pieces transformers are built from.

Biases and layer-norm parameters start as small random values rather than 0 and 1,
so that a backend that drops a bias or a scale is caught by the tests.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from .module import Module, Parameter, normal
from .tensor import Tensor

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Linear(Module):
    """y = x @ weight + bias, with weight stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, std: float = 0.02):
        super().__init__()
        self.weight = Parameter((d_in, d_out), normal(std))
        self.bias = Parameter((d_out,), normal(0.02)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num: int, dim: int, std: float = 0.02):
        super().__init__()
        self.weight = Parameter((num, dim), normal(std))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = Parameter((dim,), normal(0.02, mean=1.0))
        self.bias = Parameter((dim,), normal(0.02))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


def padding_mask_bias(mask, dtype="f32"):
    """[batch, keys] mask of 1 (attend) / 0 (padding) -> additive bias [batch, 1, 1, keys]."""
    keep = F.cast(mask, dtype)
    return F.unsqueeze(F.unsqueeze((1.0 - keep) * -1e9, 1), 1)


class MultiHeadAttention(Module):
    """Scaled dot-product attention over `n_head` heads.

    Self attention when `context` is None, cross attention over `context` otherwise.
    `causal` masks future keys; `mask_bias` is an additive bias broadcast to
    [batch, heads, queries, keys] (see `padding_mask_bias`)."""

    def __init__(self, d_model: int, n_head: int, bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.d_head = n_head, d_model // n_head
        self.q = Linear(d_model, d_model, bias)
        self.k = Linear(d_model, d_model, bias)
        self.v = Linear(d_model, d_model, bias)
        self.o = Linear(d_model, d_model, bias)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, self.d_head).transpose(1, 2)  # [b, h, t, d]

    def forward(self, x, context=None, causal: bool = False, mask_bias=None, cache=None):
        """`cache` (a `frontend.cache.LayerCache`): this step's keys and values are written
        into it, the queries attend over all of it, its mask replacing `causal`."""
        kv = x if context is None else context
        q, k, v = self._heads(self.q(x)), self._heads(self.k(kv)), self._heads(self.v(kv))
        if cache is not None:
            k, v = cache.update(k, v)
        scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(self.d_head))
        if cache is not None:
            scores = F.where(cache.mask, scores, float("-inf"))
        elif causal:
            scores = F.where(F.causal_mask(x.shape[1], kv.shape[1]), scores, float("-inf"))
        if mask_bias is not None:
            scores = scores + mask_bias
        out = F.softmax(scores, -1) @ v                     # [b, h, t, d]
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_head * self.d_head))


class FeedForward(Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.up = Linear(d_model, d_ff)
        self.down = Linear(d_ff, d_model)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class EncoderLayer(Module):
    """Self attention + feed-forward, each with a residual. `norm_first` is the
    pre-norm arrangement (GPT-2, ViT); otherwise post-norm (BERT, the original
    Transformer)."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, activation: str = "gelu",
                 norm_first: bool = True, eps: float = 1e-5):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_head)
        self.ff = FeedForward(d_model, d_ff, activation)
        self.ln1, self.ln2 = LayerNorm(d_model, eps), LayerNorm(d_model, eps)
        self.norm_first = norm_first

    def forward(self, x, causal: bool = False, mask_bias=None, cache=None):
        if self.norm_first:
            x = x + self.attn(self.ln1(x), causal=causal, mask_bias=mask_bias, cache=cache)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, causal=causal, mask_bias=mask_bias, cache=cache))
        return self.ln2(x + self.ff(x))


class DecoderLayer(Module):
    """Causal self attention, cross attention over the encoder output, feed-forward."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, activation: str = "relu",
                 norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_head)
        self.cross_attn = MultiHeadAttention(d_model, n_head)
        self.ff = FeedForward(d_model, d_ff, activation)
        self.ln1, self.ln2, self.ln3 = (LayerNorm(d_model, eps) for _ in range(3))
        self.norm_first = norm_first

    def forward(self, x, memory, memory_bias=None):
        if self.norm_first:
            x = x + self.self_attn(self.ln1(x), causal=True)
            x = x + self.cross_attn(self.ln2(x), context=memory, mask_bias=memory_bias)
            return x + self.ff(self.ln3(x))
        x = self.ln1(x + self.self_attn(x, causal=True))
        x = self.ln2(x + self.cross_attn(x, context=memory, mask_bias=memory_bias))
        return self.ln3(x + self.ff(x))


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    pos = np.arange(max_len)[:, None]
    rate = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((max_len, d_model))
    table[:, 0::2] = np.sin(pos * rate)
    table[:, 1::2] = np.cos(pos * rate[: d_model // 2])
    return table.astype(np.float32)


class SinusoidalPositions(Module):
    """Adds the fixed sin/cos position table of "Attention Is All You Need"."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.table = Tensor(sinusoidal_table(max_len, d_model))

    def forward(self, x):
        return x + F.slice(self.table, 0, 0, x.shape[1])


class LearnedPositions(Module):
    """Adds a learned embedding of positions 0 .. seq-1, or of the i64 `positions` given
    ([batch, seq]: a cached decode step's tokens sit further on)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.weight = Parameter((max_len, d_model), normal(0.02))

    def forward(self, x, positions=None):
        if positions is not None:
            return x + F.embedding(positions, self.weight)
        return x + F.slice(self.weight, 0, 0, x.shape[1])


class PatchEmbedding(Module):
    """Image [b, c, h, w] -> patch tokens [b, (h/p)*(w/p), d] by a stride-p convolution."""

    def __init__(self, image_size: int, patch_size: int, channels: int, d_model: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.weight = Parameter((d_model, channels, patch_size, patch_size), normal(0.02))
        self.bias = Parameter((d_model,), normal(0.02))

    def forward(self, images):
        y = F.conv2d(images, self.weight, self.bias, stride=self.patch_size)  # [b, d, h', w']
        b, d = y.shape[0], y.shape[1]
        return y.reshape(b, d, self.num_patches).transpose(1, 2)
