"""Layers of the model DSL: the pieces transformers are built from.

Biases and layer-norm parameters start as small random values rather than 0 and 1,
so that a backend that drops a bias or a scale is caught by the tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tensorc.errors import TensorcError
from tensorc.ops.sparse_attention import performer_features, window_attrs

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


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """How attention layers attend: "dense"; "local" (a window of `window` keys: causal,
    the keys up to the query; else half each side); "block" (blocks of `block`
    positions seeing their neighbour blocks); "performer" (linear attention with
    `features` random features). `global_tokens` see and are seen by all (local,
    block). The sparse ops' meaning: `tensorc/ops/sparse_attention.py`."""
    kind: str = "dense"
    window: int = 256
    block: int = 64
    features: int = 256
    global_tokens: tuple = ()
    seed: int = 0
    neighbours: int = 1    # blocks each side a block sees (0: only itself)

    KINDS = ("dense", "local", "block", "performer")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"attention {self.kind!r} is not one of {', '.join(self.KINDS)}")

    def attend(self, q, k, v, causal: bool, mask_bias, scale: float):
        """softmax attention of q [b,h,t,d] over k, v as this sparsity computes it."""
        if self.kind == "local":
            return F.local_attention(q, k, v, mask_bias, scale=scale, causal=causal,
                                     global_tokens=self.global_tokens,
                                     **window_attrs(self.window, causal))
        if self.kind == "block":
            return F.block_sparse_attention(q, k, v, mask_bias, block=self.block, scale=scale,
                                            local_blocks=self.neighbours, causal=causal,
                                            global_tokens=self.global_tokens, seed=self.seed)
        features = performer_features(q.shape[3], self.features, self.seed)
        return F.linear_attention(q, k, v, features, mask_bias, scale=scale, causal=causal)

    def cache_mask(self, cache):
        """The decode step's keep-mask [b, 1, t, L]: the cache's, cut to the window."""
        if self.kind == "dense":
            return cache.mask
        if self.kind != "local":
            raise TensorcError(f"{self.kind} attention has no key/value cache step: generate "
                               "with dense or local attention")
        keys = F.unsqueeze(F.unsqueeze(F.arange(cache.mask.shape[3]), 0), 0)    # [1, 1, L]
        near = keys >= F.unsqueeze(cache.positions, 2) - (self.window - 1)       # [b, t, L]
        for g in self.global_tokens:
            near = F.logical_or(near, F.equal(keys, g))
        return F.logical_and(cache.mask, F.unsqueeze(near, 1))


DENSE = Sparsity()


class MultiHeadAttention(Module):
    """Scaled dot-product attention over `n_head` heads.

    Self attention when `context` is None, cross attention over `context` otherwise.
    `causal` masks future keys; `mask_bias` is an additive bias broadcast to
    [batch, heads, queries, keys] (see `padding_mask_bias`). `sparsity` other than
    dense traces self attention as one sparse or linear attention op."""

    def __init__(self, d_model: int, n_head: int, bias: bool = True,
                 sparsity: Sparsity = DENSE):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.d_head = n_head, d_model // n_head
        self.sparsity = sparsity
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
        scale = 1.0 / math.sqrt(self.d_head)
        if self.sparsity.kind != "dense" and cache is None:
            out = self.sparsity.attend(q, k, v, causal, mask_bias, scale)
        else:
            scores = (q @ k.transpose(2, 3)) * scale
            if cache is not None:
                scores = F.where(self.sparsity.cache_mask(cache), scores, float("-inf"))
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
                 norm_first: bool = True, eps: float = 1e-5, dropout: float = 0.0,
                 sparsity: Sparsity = DENSE):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_head, sparsity=sparsity)
        self.ff = FeedForward(d_model, d_ff, activation)
        self.ln1, self.ln2 = LayerNorm(d_model, eps), LayerNorm(d_model, eps)
        self.norm_first, self.p = norm_first, dropout

    def forward(self, x, causal: bool = False, mask_bias=None, cache=None):
        def attn(h):   # dropout on each residual branch, as GPT-2 and BERT train
            return F.dropout(self.attn(h, causal=causal, mask_bias=mask_bias, cache=cache),
                             self.p)

        def ff(h):
            return F.dropout(self.ff(h), self.p)
        if self.norm_first:
            x = x + attn(self.ln1(x))
            return x + ff(self.ln2(x))
        x = self.ln1(x + attn(x))
        return self.ln2(x + ff(x))


class DecoderLayer(Module):
    """Causal self attention, cross attention over the encoder output, feed-forward."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, activation: str = "relu",
                 norm_first: bool = False, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_head)
        self.cross_attn = MultiHeadAttention(d_model, n_head)
        self.ff = FeedForward(d_model, d_ff, activation)
        self.ln1, self.ln2, self.ln3 = (LayerNorm(d_model, eps) for _ in range(3))
        self.norm_first, self.p = norm_first, dropout

    def forward(self, x, memory, memory_bias=None):
        def sa(h):
            return F.dropout(self.self_attn(h, causal=True), self.p)

        def ca(h):
            return F.dropout(self.cross_attn(h, context=memory, mask_bias=memory_bias), self.p)

        def ff(h):
            return F.dropout(self.ff(h), self.p)
        if self.norm_first:
            x = x + sa(self.ln1(x))
            x = x + ca(self.ln2(x))
            return x + ff(self.ln3(x))
        x = self.ln1(x + sa(x))
        x = self.ln2(x + ca(x))
        return self.ln3(x + ff(x))


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


# --- Llama-family layers: RMSNorm, rotary positions, SwiGLU, grouped-query attention ---

class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (no centring, no bias).

    Composed from primitive ops (reduce_mean, rsqrt, mul) rather than a new op: each
    backend already lowers them (one reduction kernel, the rest fused elementwise into
    whatever reads the result), and ONNX export needs no function for it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = Parameter((dim,), normal(0.02, mean=1.0))
        self.eps = eps

    def forward(self, x):
        ms = F.mean(x * x, x.ndim - 1, keepdims=True)   # a positive axis, as ONNX import gives
        return x * F.rsqrt(ms + self.eps) * self.weight


class RotaryEmbedding(Module):
    """Rotary position embedding, the Hugging Face Llama convention: frequencies
    theta^(-2i/d) for i < d/2, angles position * frequency duplicated over both halves
    of the head dim, and x * cos + rotate_half(x) * sin with
    rotate_half(x) = concat(-x[d/2:], x[:d/2]).

    The tables come from the positions (an i64 [batch, t] or [t] tensor), so cached
    decoding can pass the absolute positions of its new tokens. The rotation is
    written half by half, concat(x1 cos - x2 sin, x2 cos + x1 sin) (the same
    operations as HF's formula, so the same roundings), which writes the rotated
    tensor in one pass without materialising rotate_half(x)."""

    def __init__(self, d_head: int, theta: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got {d_head}")
        self.d_head = d_head
        inv = 1.0 / theta ** (np.arange(0, d_head, 2, dtype=np.int64).astype(np.float32)
                              / d_head)
        self.inv_freq = Tensor(inv.astype(np.float32))

    def tables(self, positions):
        """(cos, sin), each [.., t, d/2] for positions [.., t]; a [batch, t] position
        tensor gives [batch, 1, t, d/2] so that the tables broadcast over heads."""
        pos = F.cast(positions, "f32")
        angles = F.unsqueeze(pos, pos.ndim) * self.inv_freq
        if angles.ndim == 3:
            angles = F.unsqueeze(angles, 1)
        return F.cos(angles), F.sin(angles)

    def rotate(self, x, cos, sin):
        """x [b, heads, t, d] rotated by the tables of `tables`."""
        half = self.d_head // 2
        x1, x2 = F.slice(x, 3, 0, half), F.slice(x, 3, half, self.d_head)
        return F.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=3)


def repeat_kv(x, n_rep: int):
    """[b, hk, s, d] -> [b, hk * n_rep, s, d], each head repeated n_rep times (Hugging
    Face's `repeat_kv`). `fuse-attention` sees through it: the fused op reads the
    hk heads in place."""
    if n_rep == 1:
        return x
    b, hk, s, d = x.shape
    return F.expand(F.unsqueeze(x, 2), (b, hk, n_rep, s, d)).reshape(b, hk * n_rep, s, d)


class SwiGLU(Module):
    """The gated feed-forward of Llama: down(silu(gate(x)) * up(x)), no biases;
    silu(x) = x * sigmoid(x)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = Linear(d_model, d_ff, bias=False)
        self.up = Linear(d_model, d_ff, bias=False)
        self.down = Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        g = self.gate(x)
        return self.down(g * F.sigmoid(g) * self.up(x))


class GroupedQueryAttention(Module):
    """Causal self attention with `n_head` query heads sharing `n_kv_head` key/value
    heads (n_kv_head divides n_head), rotary positions on q and k, no biases.

    `project` computes q, k (rotated) and v in one place; `forward` then attends. It
    takes an optional `cache` with `positions` (i64 [b, t], the absolute positions of
    the new tokens), `update(k, v) -> (k_all, v_all)` ([b, hk, L, d] once this step's
    rows are written) and `mask` (bool [b, 1, t, L], True = visible), which replaces
    the causal mask. Keys are cached after rotation."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, theta: float = 10000.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        if n_head % n_kv_head:
            raise ValueError(f"n_head {n_head} is not divisible by n_kv_head {n_kv_head}")
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.d_head = d_model // n_head
        self.q = Linear(d_model, n_head * self.d_head, bias=False)
        self.k = Linear(d_model, n_kv_head * self.d_head, bias=False)
        self.v = Linear(d_model, n_kv_head * self.d_head, bias=False)
        self.o = Linear(n_head * self.d_head, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.d_head, theta)

    def _heads(self, x, n):
        b, t, _ = x.shape
        return x.reshape(b, t, n, self.d_head).transpose(1, 2)  # [b, n, t, d]

    def project(self, x, positions=None):
        """q [b, h, t, d] and k [b, hk, t, d] rotated to `positions`, v [b, hk, t, d]."""
        q = self._heads(self.q(x), self.n_head)
        k = self._heads(self.k(x), self.n_kv_head)
        v = self._heads(self.v(x), self.n_kv_head)
        cos, sin = self.rotary.tables(F.arange(x.shape[1]) if positions is None else positions)
        return self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin), v

    def forward(self, x, positions=None, cache=None):
        if cache is not None:
            positions = cache.positions
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(self.d_head))
        keep = cache.mask if cache is not None else F.causal_mask(q.shape[2], k.shape[2])
        scores = F.where(keep, scores, float("-inf"))
        out = F.softmax(scores, -1) @ v                     # [b, h, t, d]
        b, _, t, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_head * self.d_head))


class LlamaBlock(Module):
    """Pre-norm decoder block: x + attn(rms(x)), then + swiglu(rms(x))."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, d_ff: int,
                 eps: float = 1e-6, theta: float = 10000.0):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = GroupedQueryAttention(d_model, n_head, n_kv_head, theta)
        self.ff_norm = RMSNorm(d_model, eps)
        self.ff = SwiGLU(d_model, d_ff)

    def forward(self, x, positions=None, cache=None):
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.ff(self.ff_norm(x))
