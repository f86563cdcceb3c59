"""Lowering: Graph -> Program (kernels in the kernel IR, library calls, a buffer plan).

Lowering runs once per set of concrete input shapes. Its parts, bottom up:

- `program.py`: what a backend receives. Planned buffers (`Buf`), strided windows of
  them (`View`), and the steps: generated kernels (`KernelStep`), library calls and
  reference fallbacks (`Call`), index checks (`IndexCheck`).
- `views.py`: lazy values. An elementwise op builds an expression over strided reads
  (`Access`) and index arithmetic (`Index`); a view op (transpose, reshape, slice,
  expand, ...) only rewrites the reads' strides. So a chain like
  `where(mask, matmul * scale, -inf)` costs no memory and no kernel of its own: it is
  evaluated inside whichever kernel reads it.
- `kernels.py`: the kernel builder. A lazy value is *materialised* by a loop nest
  that writes it (`write_kernel`), a reduction by a kernel over rows (`Rows`).
- `walk.py`: the walk over the graph, applying each node's rule, and the buffer plan
  (liveness packing into one arena, `plan.py`). A value is materialised when an op
  needs memory (matmul, outputs, a fallback), when a reduction reads it, or when a
  value with arithmetic in it has several users (to avoid recomputing it).
- `rules/`: one module per op family (elementwise, reduction, matmul, attention,
  conv, shape). `rules/elementwise.py` is also the one home of the exp/tanh/erf/gelu
  maths, which every target's code generator builds through it.

Library calls: matmul (the target's GEMM), attention (flash attention), conv2d (an
im2col kernel + GEMM). Lowering makes no fusion decision of its own: fused regions
are lowered through their body graph, and a GEMM takes the ops after it as its
bias/activation/residual epilogue only inside a region (the `fuse-epilogues` pass
made it); q/k/v merging is the `merge-projections` pass. Composite ops without a
rule lower through their `decompose`; an op with no rule runs its registry reference as a
`Call(fallback=True)`, listed with its reason in `Program.stats()["fallbacks"]`.

The Program is target-neutral: `backends/llvm/` renders its kernels to LLVM IR,
`backends/cupy/` to CUDA C.
"""

from .program import Buf, Call, IndexCheck, KernelStep, Program, View
from .walk import lower, planned_memory

__all__ = ["Buf", "Call", "IndexCheck", "KernelStep", "Program", "View", "lower",
           "planned_memory"]
