"""The original encoder-decoder Transformer ("Attention Is All You Need"): post-norm
layers, ReLU feed-forward, sinusoidal positions, shared and tied embeddings.
`n_layer` is the depth of the encoder and of the decoder."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tensorc.frontend import DecoderLayer, Embedding, EncoderLayer, SinusoidalPositions

from .base import Config, ZooModel


@dataclasses.dataclass
class TransformerConfig(Config):
    eps: float = 1e-5


PRESETS = {
    "tiny": TransformerConfig(vocab_size=89, d_model=32, n_layer=2, n_head=4, d_ff=64,
                              max_seq_len=64),
    "small": TransformerConfig(vocab_size=8192, d_model=512, n_layer=3, n_head=8, d_ff=2048,
                               max_seq_len=512),
}


class Transformer(ZooModel):
    def __init__(self, c: TransformerConfig):
        super().__init__(c)
        self.emb = Embedding(c.vocab_size, c.d_model)
        self.pos = SinusoidalPositions(c.max_seq_len, c.d_model)
        self.encoder = [EncoderLayer(c.d_model, c.n_head, c.d_ff, "relu", norm_first=False,
                                     eps=c.eps, dropout=c.dropout) for _ in range(c.n_layer)]
        self.decoder = [DecoderLayer(c.d_model, c.n_head, c.d_ff, "relu", eps=c.eps,
                                     dropout=c.dropout)
                        for _ in range(c.n_layer)]
        self.scale = math.sqrt(c.d_model)

    def forward(self, src_ids, tgt_ids):
        memory = self.pos(self.emb(src_ids) * self.scale)
        for layer in self.encoder:
            memory = layer(memory)
        x = self.pos(self.emb(tgt_ids) * self.scale)
        for layer in self.decoder:
            x = layer(x, memory)
        return x @ self.emb.weight.T

    def example_inputs(self, batch=1, seq=None, seed=0):
        rng = np.random.default_rng(seed)
        src = self._token_ids(rng, batch, seq)
        tgt = self._token_ids(rng, batch, max(1, src.shape[1] - 3))  # a shorter target
        return {"src_ids": src, "tgt_ids": tgt}
