"""BERT: a post-norm encoder with erf-gelu, a padding mask and a masked-LM head."""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorc.frontend import (
    Embedding,
    EncoderLayer,
    F,
    LayerNorm,
    LearnedPositions,
    Linear,
    Parameter,
    normal,
    padding_mask_bias,
)

from .base import SparseConfig, ZooModel


@dataclasses.dataclass
class BertConfig(SparseConfig):
    eps: float = 1e-12


PRESETS = {
    "tiny": BertConfig(vocab_size=101, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64),
    "small": BertConfig(vocab_size=8192, d_model=512, n_layer=6, n_head=8, d_ff=2048,
                        max_seq_len=512),
}


class Bert(ZooModel):
    def __init__(self, c: BertConfig):
        super().__init__(c)
        self.tok = Embedding(c.vocab_size, c.d_model)
        self.pos = LearnedPositions(c.max_seq_len, c.d_model)
        self.emb_ln = LayerNorm(c.d_model, c.eps)
        self.layers = [EncoderLayer(c.d_model, c.n_head, c.d_ff, "gelu", norm_first=False,
                                    eps=c.eps, dropout=c.dropout, sparsity=c.sparsity())
                       for _ in range(c.n_layer)]
        self.mlm_dense = Linear(c.d_model, c.d_model)
        self.mlm_ln = LayerNorm(c.d_model, c.eps)
        self.mlm_bias = Parameter((c.vocab_size,), normal(0.02))

    def forward(self, input_ids, attention_mask):
        x = self.emb_ln(self.pos(self.tok(input_ids)))
        bias = padding_mask_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, mask_bias=bias)
        h = self.mlm_ln(F.gelu(self.mlm_dense(x)))
        return h @ self.tok.weight.T + self.mlm_bias  # tied decoder

    def example_inputs(self, batch=1, seq=None, seed=0):
        rng = np.random.default_rng(seed)
        ids = self._token_ids(rng, batch, seq)
        lengths = rng.integers(max(1, ids.shape[1] // 2), ids.shape[1] + 1, batch)
        lengths[0] = ids.shape[1]  # one full row, the rest padded at random lengths
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask}
