"""Llama: a decoder-only causal language model in the Llama arrangement (pre-norm
blocks with RMSNorm, rotary positions, grouped-query attention, SwiGLU feed-forward,
no biases, an untied output head)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorc.frontend import Embedding, F, Linear, LlamaBlock, RMSNorm

from .base import Config, ZooModel


@dataclasses.dataclass
class LlamaConfig(Config):
    n_kv_head: int = 2          # key/value heads, shared by n_head / n_kv_head query heads
    eps: float = 1e-6           # RMSNorm epsilon
    rope_theta: float = 10000.0


PRESETS = {
    "tiny": LlamaConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                        d_ff=64, max_seq_len=64),
    "small": LlamaConfig(vocab_size=8192, d_model=512, n_layer=6, n_head=8, n_kv_head=2,
                         d_ff=1376, max_seq_len=1024),
}


class Llama(ZooModel):
    def __init__(self, c: LlamaConfig):
        super().__init__(c)
        self.embed = Embedding(c.vocab_size, c.d_model)
        self.layers = [LlamaBlock(c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.eps,
                                  c.rope_theta) for _ in range(c.n_layer)]
        self.norm = RMSNorm(c.d_model, c.eps)
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, input_ids, cache=None):
        """Logits of every position. `cache`: a `frontend.cache.KVCache` when tracing a
        decode step (its positions rotate q and k; keys are cached rotated)."""
        x = self.embed(input_ids)
        positions = F.arange(input_ids.shape[1]) if cache is None else cache.positions
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, None if cache is None else cache.layer(i))
        return self.lm_head(self.norm(x))

    def cache_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of its key/value cache."""
        c = self.config
        return c.n_layer, c.n_kv_head, c.d_model // c.n_head

    def example_inputs(self, batch=1, seq=None, seed=0):
        return {"input_ids": self._token_ids(np.random.default_rng(seed), batch, seq)}
