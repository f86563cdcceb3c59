"""How models get in: the model-definition DSL and the tracer (ONNX import/export
lives here too)."""

from . import functional as F
from .layers import (
    DecoderLayer,
    Embedding,
    EncoderLayer,
    FeedForward,
    GroupedQueryAttention,
    LayerNorm,
    LearnedPositions,
    Linear,
    LlamaBlock,
    MultiHeadAttention,
    PatchEmbedding,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    Sparsity,
    SwiGLU,
    padding_mask_bias,
    repeat_kv,
)
from .module import GraphModule, Module, ModuleList, Parameter, constant, normal
from .tensor import Tensor
from .trace import trace

__all__ = [
    "F", "DecoderLayer", "Embedding", "EncoderLayer", "FeedForward", "GraphModule",
    "GroupedQueryAttention",
    "LayerNorm", "LearnedPositions", "LlamaBlock", "Linear", "Module", "ModuleList",
    "MultiHeadAttention", "PatchEmbedding", "Parameter", "RMSNorm", "RotaryEmbedding",
    "SinusoidalPositions", "Sparsity", "SwiGLU", "Tensor", "constant", "normal",
    "padding_mask_bias", "repeat_kv", "trace",
]
