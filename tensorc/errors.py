"""User-facing errors.

Every error a user can cause derives from `TensorcError`; its message is one
line naming the problem. The CLI prints it and exits 2; anything else that
escapes is a bug in tensorc and gets a traceback.
"""


class TensorcError(Exception):
    """A problem with the user's input: model, graph, file, shapes or options."""


class ShapeError(TensorcError):
    """Type inference failed: shapes or dtypes that do not fit an op."""


class UnsupportedOpError(TensorcError):
    """An op name that the registry (or a backend, or an importer) does not know."""


class VerifyError(TensorcError):
    """A graph breaks an IR invariant (SSA, topological order, types)."""


class ParseError(TensorcError):
    """Text IR that does not parse."""


class TraceError(TensorcError):
    """The model cannot be traced, e.g. Python control flow on tensor values."""


class InputError(TensorcError):
    """Inputs given to an executable do not match the graph's declared inputs."""


class FallbackError(TensorcError):
    """Strict mode (`--strict`, TENSORC_STRICT=1): an op would run the numpy reference
    on a compiled backend."""
