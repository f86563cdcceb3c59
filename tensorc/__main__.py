"""`python -m tensorc`: the CLI (how `--mesh` starts its ranks under mpiexec)."""

from .cli import main

raise SystemExit(main())
