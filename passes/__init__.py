"""Graph passes and pipelines.

A pass is a named function ``Graph -> Graph``. A pipeline is text: comma-separated
pass or pipeline names, each with optional arguments (``O2,my-pass:key=value``).
The registry and runner live in `manager.py`; this package's import loads the pass
modules (which register into it) and names the pipelines.
"""

from . import (  # noqa: F401  (they register their passes)
    attention,
    autodiff,
    fusion,
    gemm,
    prune,
    quantize,
    shard,
    simplify,
    sparse_attention,
    sparse_weights,
    weights,
)
from .manager import (
    EXPLAINERS,
    PASSES,
    PIPELINES,
    explain,
    parse_pipeline,
    register_pass,
    run_pipeline,
)

__all__ = ["EXPLAINERS", "LOSSY", "PASSES", "PIPELINES", "explain", "parse_pipeline",
           "register_pass", "run_pipeline"]

# Passes that change the numbers on purpose (`compare` shows them next to the float
# pipeline).
LOSSY = {"quantize", "cast-weights", "sparsify-attention", "linearize-attention", "prune",
         "sparsify-weights"}

# Pipelines name the passes in order.
PIPELINES["O1"] = ["fold-constants", "simplify", "cse", "dce"]
PIPELINES["O2"] = ["O1", "fuse-patterns", "fuse-attention", "fold-constants", "cse",
                   "merge-projections", "fuse-epilogues", "fuse-regions"]
# What O2 runs on a rank's local graph: `shard` ran the first three before it partitioned.
PIPELINES["O2-local"] = PIPELINES["O2"][PIPELINES["O2"].index("fuse-attention") + 1:]
