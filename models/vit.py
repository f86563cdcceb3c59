"""ViT: patch embedding, a class token, learned positions, pre-norm encoder layers and
a classification head on the class token. Presets follow ViT-S/16 for `small`.
The common `vocab_size` field is the number of classes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tensorc.errors import TensorcError
from tensorc.frontend import (
    EncoderLayer,
    F,
    LayerNorm,
    Linear,
    Parameter,
    PatchEmbedding,
    normal,
)
from tensorc.resources import check_fits

from .base import Config, ZooModel


@dataclasses.dataclass
class ViTConfig(Config):
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    eps: float = 1e-6


PRESETS = {
    "tiny": ViTConfig(vocab_size=10, d_model=32, n_layer=2, n_head=4, d_ff=64,
                      image_size=32, patch_size=8),
    "small": ViTConfig(vocab_size=1000, d_model=384, n_layer=12, n_head=6, d_ff=1536,
                       image_size=224, patch_size=16),
}


class ViT(ZooModel):
    def __init__(self, c: ViTConfig):
        super().__init__(c)
        self.patch = PatchEmbedding(c.image_size, c.patch_size, c.channels, c.d_model)
        n = self.patch.num_patches + 1
        c.max_seq_len = n  # the token count is fixed by the image and patch sizes
        self.cls_token = Parameter((1, 1, c.d_model), normal(0.02))
        self.pos = Parameter((1, n, c.d_model), normal(0.02))
        self.layers = [EncoderLayer(c.d_model, c.n_head, c.d_ff, "gelu", norm_first=True,
                                    eps=c.eps, dropout=c.dropout) for _ in range(c.n_layer)]
        self.ln = LayerNorm(c.d_model, c.eps)
        self.head = Linear(c.d_model, c.vocab_size)

    def forward(self, pixel_values):
        x = self.patch(pixel_values)
        b, _, d = x.shape
        x = F.concat([self.cls_token.expand(b, 1, d), x], axis=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])

    def example_inputs(self, batch=1, seq=None, seed=0):
        c = self.config
        if seq is not None:
            raise TensorcError("vit takes images, so seq does not apply: set image_size "
                               "and patch_size instead")
        rng = np.random.default_rng(seed)
        shape = (batch, c.channels, c.image_size, c.image_size)
        check_fits(8 * math.prod(shape), f"example images of shape {list(shape)}")
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
