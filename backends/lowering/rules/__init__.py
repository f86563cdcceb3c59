"""Lowering rules, one module per op family. A rule is
`rule(lowering, node, inputs, attrs) -> outputs` (lazy values); it raises
`NotLowerable` for inputs it does not handle."""

from . import attention, collective, conv, elementwise, matmul, reduction, shape

_FAMILIES = (elementwise, reduction, matmul, attention, conv, shape, collective)

RULES: dict = {}
for _family in _FAMILIES:
    assert not RULES.keys() & _family.RULES.keys(), "an op has one rule, in one family"
    RULES.update(_family.RULES)
