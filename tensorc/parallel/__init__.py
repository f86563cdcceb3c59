"""Parallelism: running one model on a mesh of ranks (tensor, data and pipeline
parallel). `comm.py` holds the communicators collectives run on."""
