"""A fuzzer for everything a user hands tensorc: ONNX files, artifacts, IR text,
npz/safetensors files and command lines (see harness.py; `python -m tests.fuzz`)."""
