"""GPT: a decoder-only causal language model in the GPT-2 arrangement (pre-norm
blocks, tanh-gelu, learned positions, input and output embeddings tied)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorc.frontend import Embedding, EncoderLayer, F, LayerNorm, LearnedPositions

from .base import SparseConfig, ZooModel


@dataclasses.dataclass
class GPTConfig(SparseConfig):
    eps: float = 1e-5


PRESETS = {
    "tiny": GPTConfig(vocab_size=97, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64),
    "small": GPTConfig(vocab_size=8192, d_model=512, n_layer=6, n_head=8, d_ff=2048,
                       max_seq_len=1024),
}


class GPT(ZooModel):
    def __init__(self, c: GPTConfig):
        super().__init__(c)
        self.wte = Embedding(c.vocab_size, c.d_model)
        self.wpe = LearnedPositions(c.max_seq_len, c.d_model)
        self.blocks = [EncoderLayer(c.d_model, c.n_head, c.d_ff, "gelu_tanh", norm_first=True,
                                    eps=c.eps, dropout=c.dropout, sparsity=c.sparsity())
                       for _ in range(c.n_layer)]
        self.ln_f = LayerNorm(c.d_model, c.eps)

    def forward(self, input_ids, cache=None):
        """`cache`: a `frontend.cache.KVCache` when tracing a decode step."""
        x = self.wpe(self.wte(input_ids), cache.positions if cache is not None else None)
        x = F.dropout(x, self.config.dropout)
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, cache=cache.layer(i) if cache is not None else None)
        return self.ln_f(x) @ self.wte.weight.T  # tied output embedding

    def cache_layout(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of its key/value cache."""
        c = self.config
        return c.n_layer, c.n_head, c.d_model // c.n_head

    def example_inputs(self, batch=1, seq=None, seed=0):
        return {"input_ids": self._token_ids(np.random.default_rng(seed), batch, seq)}
