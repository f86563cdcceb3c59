"""The op registry and every op definition. Importing this package registers them all."""

# imported for their side effect: registering the ops
from . import attention, collective, elementwise, extra, fused, nn, quant, shape, sparse_attention  # noqa: F401, E501
from .registry import OPS, REQUIRED, Attr, OpDef, get_op, register

__all__ = ["OPS", "REQUIRED", "Attr", "OpDef", "get_op", "register"]
