"""The op registry and every op definition. Importing this package registers them all."""

# imported for their side effect: registering the ops
from . import (  # noqa: F401, E501
    attention,
    collective,
    elementwise,
    extra,
    fused,
    indexing,
    nn,
    quant,
    shape,
    sparse_attention,
)
from .registry import OPS, REQUIRED, Attr, OpDef, get_op, register

__all__ = ["OPS", "REQUIRED", "Attr", "OpDef", "get_op", "register"]
