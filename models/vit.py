"""ViT: patch embedding, a class token, learned positions, pre-norm encoder layers and
a classification head on the class token. Presets follow ViT-S/16 for `small`.
The common `vocab_size` field is the number of classes.

`attention="block"` attends within square windows of `window` x `window` patches
(Swin's windows, not shifted): the patches are put in window order once, after the
positions are added, so each window is one block of positions, and the class token
goes last as a global token. `attention="performer"` is linear attention; `local` (a
window along the raster order) is refused."""

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

from .base import SparseConfig, ZooModel


@dataclasses.dataclass
class ViTConfig(SparseConfig):
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
        sparsity = c.sparsity()
        if c.attention == "local":
            raise TensorcError("vit takes attention=dense, block (windows of patches) or "
                               "performer, not local")
        if c.attention == "block":
            grid = c.image_size // c.patch_size
            if grid % c.window:
                raise TensorcError(f"vit block attention needs the patch grid ({grid} x "
                                   f"{grid}) to be a multiple of window={c.window}")
            sparsity = dataclasses.replace(sparsity, block=c.window ** 2, neighbours=0,
                                           global_tokens=(n - 1,))
        self.layers = [EncoderLayer(c.d_model, c.n_head, c.d_ff, "gelu", norm_first=True,
                                    eps=c.eps, dropout=c.dropout, sparsity=sparsity)
                       for _ in range(c.n_layer)]
        self.ln = LayerNorm(c.d_model, c.eps)
        self.head = Linear(c.d_model, c.vocab_size)

    def forward(self, pixel_values):
        x = self.patch(pixel_values)
        b, _, d = x.shape
        x = F.concat([self.cls_token.expand(b, 1, d), x], axis=1) + self.pos
        cls = 0
        if self.config.attention == "block":
            x, cls = F.concat([self._windows(x[:, 1:]), x[:, :1]], axis=1), -1
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, cls])

    def _windows(self, x):
        """Patches [b, g*g, d] in raster order -> window by window, each window's
        w x w patches in raster order."""
        b, _, d = x.shape
        g, w = self.config.image_size // self.config.patch_size, self.config.window
        x = x.reshape(b, g // w, w, g // w, w, d).transpose(2, 3)
        return x.reshape(b, g * g, d)

    def example_inputs(self, batch=1, seq=None, seed=0):
        c = self.config
        if seq is not None:
            raise TensorcError("vit takes images, so seq does not apply: set image_size "
                               "and patch_size instead")
        rng = np.random.default_rng(seed)
        shape = (batch, c.channels, c.image_size, c.image_size)
        check_fits(8 * math.prod(shape), f"example images of shape {list(shape)}")
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
