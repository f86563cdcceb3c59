"""What every zoo model shares: a config dataclass, presets and example inputs."""

from __future__ import annotations

import dataclasses

import numpy as np

from tensorc.errors import TensorcError
from tensorc.frontend import Module, Sparsity
from tensorc.resources import check_fits


@dataclasses.dataclass
class Config:
    """Field names common to all models; each model adds its own."""

    vocab_size: int = 1000
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_ff: int = 256
    max_seq_len: int = 128
    dropout: float = 0.0    # while training (tensorc train); inference never drops


@dataclasses.dataclass
class SparseConfig(Config):
    """A model whose self attention can be sparse or linear (`frontend.Sparsity`):
    attention = dense | local (a window of `window` keys) | block (blocks of `block`
    positions and their neighbours) | performer (`features` random features), with
    `global_tokens` of the first positions seeing and seen by all."""

    attention: str = "dense"
    window: int = 256
    block: int = 64
    features: int = 256
    global_tokens: int = 0

    CHOICES = {"attention": Sparsity.KINDS}

    def sparsity(self) -> Sparsity:
        return Sparsity(self.attention, self.window, self.block, self.features,
                        tuple(range(self.global_tokens)))


class ZooModel(Module):
    """A built-in model: `config`, `output_names`, and `example_inputs(batch, seq)`."""

    output_names = ("logits",)
    default_seq = 16

    def __init__(self, config):
        super().__init__()
        self.config = config

    def example_inputs(self, batch: int = 1, seq: int | None = None, seed: int = 0
                       ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _token_ids(self, rng, batch: int, seq: int | None) -> np.ndarray:
        seq = self.default_seq if seq is None else seq
        if seq > self.config.max_seq_len:
            raise TensorcError(f"seq {seq} exceeds max_seq_len {self.config.max_seq_len}")
        check_fits(8 * batch * seq, f"example token ids of batch {batch} x seq {seq}")
        return rng.integers(0, self.config.vocab_size, (batch, seq), dtype=np.int64)
