"""How models get in: the model-definition DSL and the tracer (ONNX import/export
lives here too)."""

from . import functional as F
from .layers import (
    DecoderLayer,
    Embedding,
    EncoderLayer,
    FeedForward,
    LayerNorm,
    LearnedPositions,
    Linear,
    MultiHeadAttention,
    PatchEmbedding,
    SinusoidalPositions,
    padding_mask_bias,
)
from .module import Module, ModuleList, Parameter, constant, normal
from .tensor import Tensor
from .trace import trace

__all__ = [
    "F", "DecoderLayer", "Embedding", "EncoderLayer", "FeedForward", "LayerNorm",
    "LearnedPositions", "Linear", "Module", "ModuleList", "MultiHeadAttention",
    "PatchEmbedding", "Parameter", "SinusoidalPositions", "Tensor", "constant", "normal",
    "padding_mask_bias", "trace",
]
