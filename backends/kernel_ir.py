"""The kernel IR: small, target-neutral loop nests that code generators render.

A `Kernel` is a function over flat buffers (one per argument, element-indexed,
row-major data laid out by the caller) whose body is a list of statements:

    Loop(var, extent, body, parallel=False, vector=0)   for var in 0..extent-1
    Store(buf, index, value)                            buf[index] = value
    Decl(name, init)                                    a mutable scalar local
    Assign(name, value)                                 name = value

and expressions (each carries its dtype, one of tensorc's dtype names):

    Const(value, dtype)       Var(name, dtype)            Load(buf, index)
    Unary(op, x)              Binary(op, a, b)            Select(cond, a, b)
    Cast(x, dtype)

Index arithmetic is ordinary `Binary` on i64 values ("add", "mul", "floordiv",
"mod"); loop variables are i64. All extents are concrete ints: backends specialise
kernels on the shapes of a call.

Conventions every renderer follows:
- At most one loop is `parallel`, and it is the outermost statement of the body.
  The rendered function runs only iterations [lo, hi) of it, so a runtime can
  split the loop across threads (CPU) or blocks (GPU). A kernel without a
  parallel loop runs whole for any [lo, hi) with lo < hi; callers pass (0, 1).
- `vector` on a loop is a hint: the preferred SIMD width (0 = let the target
  decide). Renderers may ignore it.
- Float arithmetic may be reassociated (reductions are vectorised); no other
  fast-math assumption is allowed (inputs hold -inf for masks, and NaN must
  propagate through arithmetic).
- Unary ops: neg abs exp log sqrt rsqrt reciprocal tanh erf sigmoid relu sin cos
  floor round (half to even) not. Binary ops: add sub mul div pow max min mod floordiv
  (ints), and the comparisons eq lt le gt ge (giving bool) and and/or (bool).
- Semantics are numpy's: float max/min (and relu) return NaN if an operand is NaN,
  like np.maximum/np.minimum; comparisons with NaN are false.

`format_kernel` prints a kernel as C-like text; it is also the kernel's identity
(`Kernel.key`), so identical kernels are compiled once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

COMPARE_OPS = ("eq", "lt", "le", "gt", "ge")
LOGIC_OPS = ("and", "or")
FLOAT_DTYPES = ("f16", "f32", "f64")


class Expr:
    dtype: str

    # Operator sugar keeps kernel builders readable: `i * 16 + j`.
    def __add__(self, other):
        return binary("add", self, other)

    def __mul__(self, other):
        return binary("mul", self, other)

    def __sub__(self, other):
        return binary("sub", self, other)


@dataclass(frozen=True, eq=False)
class Const(Expr):
    value: float | int | bool
    dtype: str = "f32"


@dataclass(frozen=True, eq=False)
class Var(Expr):
    name: str
    dtype: str = "i64"


@dataclass(frozen=True, eq=False)
class Buffer:
    """A kernel argument: a flat array of `dtype`; `name` is for printing only."""
    name: str
    dtype: str
    readonly: bool = True


@dataclass(frozen=True, eq=False)
class Load(Expr):
    buf: Buffer
    index: Expr

    @property
    def dtype(self) -> str:
        return self.buf.dtype


@dataclass(frozen=True, eq=False)
class Unary(Expr):
    op: str
    x: Expr

    @property
    def dtype(self) -> str:
        return "bool" if self.op == "not" else self.x.dtype


@dataclass(frozen=True, eq=False)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    @property
    def dtype(self) -> str:
        return "bool" if self.op in COMPARE_OPS + LOGIC_OPS else self.a.dtype


@dataclass(frozen=True, eq=False)
class Select(Expr):
    cond: Expr
    a: Expr
    b: Expr

    @property
    def dtype(self) -> str:
        return self.a.dtype


@dataclass(frozen=True, eq=False)
class Cast(Expr):
    x: Expr
    dtype: str


class Stmt:
    pass


@dataclass(eq=False)
class Loop(Stmt):
    var: Var
    extent: int
    body: list[Stmt]
    parallel: bool = False
    vector: int = 0


@dataclass(eq=False)
class Store(Stmt):
    buf: Buffer
    index: Expr
    value: Expr


@dataclass(eq=False)
class Decl(Stmt):
    var: Var
    init: Expr


@dataclass(eq=False)
class Assign(Stmt):
    var: Var
    value: Expr


@dataclass(eq=False)
class Kernel:
    """`buffers` are the arguments in call order; `name` is set from the content."""
    buffers: list[Buffer]
    body: list[Stmt]
    kind: str = "kernel"   # what it computes, for people reading stats and .ll files
    name: str = field(default="")

    def __post_init__(self):
        if not self.name:
            self.name = f"{self.kind}_{self.key[:12]}"

    @property
    def key(self) -> str:
        return hashlib.sha256(format_kernel(self, "k").encode()).hexdigest()

    @property
    def parallel_extent(self) -> int:
        """Iterations of the parallel loop (1 if there is none)."""
        first = self.body[0] if self.body else None
        return first.extent if isinstance(first, Loop) and first.parallel else 1


# --- builders: fold constants so generated index arithmetic stays small ---------------

def const_index(n: int) -> Const:
    return Const(int(n), "i64")


def _as_expr(x, like: Expr) -> Expr:
    return x if isinstance(x, Expr) else Const(x, like.dtype)


def binary(op: str, a, b) -> Expr:
    a = _as_expr(a, b) if isinstance(b, Expr) else a
    b = _as_expr(b, a)
    if isinstance(a, Const) and isinstance(b, Const) and a.dtype == "i64":
        fold = {"add": a.value + b.value, "mul": a.value * b.value, "sub": a.value - b.value}
        if op in fold:
            return const_index(fold[op])
    if a.dtype == "i64":  # index algebra identities
        if op == "mul" and (_is(a, 0) or _is(b, 0)):
            return const_index(0)
        if op == "mul" and _is(b, 1):
            return a
        if op == "mul" and _is(a, 1):
            return b
        if op == "add" and _is(b, 0):
            return a
        if op == "add" and _is(a, 0):
            return b
    return Binary(op, a, b)


def _is(e: Expr, v) -> bool:
    return isinstance(e, Const) and e.value == v


def affine(offset: int, terms: list[tuple[Expr, int]]) -> Expr:
    """offset + sum(var * coef): the usual address of a strided access."""
    e: Expr = const_index(offset)
    for var, coef in terms:
        if coef:
            e = binary("add", e, binary("mul", var, const_index(coef)))
    return e


# --- printing -----------------------------------------------------------------------

def format_expr(e: Expr) -> str:
    if isinstance(e, Const):
        return repr(e.value) if e.dtype in ("i64", "bool") else f"{e.value!r}:{e.dtype}"
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Load):
        return f"{e.buf.name}[{format_expr(e.index)}]"
    if isinstance(e, Unary):
        return f"{e.op}({format_expr(e.x)})"
    if isinstance(e, Binary):
        return f"{e.op}({format_expr(e.a)}, {format_expr(e.b)})"
    if isinstance(e, Select):
        return f"select({format_expr(e.cond)}, {format_expr(e.a)}, {format_expr(e.b)})"
    if isinstance(e, Cast):
        return f"{e.dtype}({format_expr(e.x)})"
    raise TypeError(f"not a kernel IR expression: {e!r}")


def format_stmts(stmts: list[Stmt], indent: str = "  ") -> list[str]:
    lines = []
    for s in stmts:
        if isinstance(s, Loop):
            hint = (" parallel" if s.parallel else "") + (f" vector({s.vector})" if s.vector
                                                          else "")
            lines.append(f"{indent}for {s.var.name} in 0..{s.extent}{hint} {{")
            lines += format_stmts(s.body, indent + "  ")
            lines.append(indent + "}")
        elif isinstance(s, Store):
            lines.append(f"{indent}{s.buf.name}[{format_expr(s.index)}] = "
                         f"{format_expr(s.value)}")
        elif isinstance(s, Decl):
            lines.append(f"{indent}{s.var.dtype} {s.var.name} = {format_expr(s.init)}")
        elif isinstance(s, Assign):
            lines.append(f"{indent}{s.var.name} = {format_expr(s.value)}")
        else:
            raise TypeError(f"not a kernel IR statement: {s!r}")
    return lines


def format_kernel(k: Kernel, name: str | None = None) -> str:
    args = ", ".join(f"{'const ' if b.readonly else ''}{b.dtype}* {b.name}" for b in k.buffers)
    return "\n".join([f"kernel {name or k.name}({args}) {{", *format_stmts(k.body), "}"])
