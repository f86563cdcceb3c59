#!/usr/bin/env bash
# The cupy backend's checks on a machine with an NVIDIA GPU, in one go: device facts,
# the GPU tests, then benchmarks/gpu.py. Made for a short, metered GPU lease: each
# step has its own time limit, and every log is written as it goes, so whatever ran
# before a limit is kept.
#
#   bash tools/gpu_check.sh            # logs into $OUT, or gpu_logs/ when OUT is unset
#
# The machine needs Python with cupy, numpy, onnx, llvmlite, networkx, pytest and
# hypothesis (torch for the peers); nothing is downloaded: the project is installed
# without its dependencies. Limits (seconds): TEST_S, BENCH_S, COMPILE_S, GEN_S, CLI_S.
# TEST_K selects tests (default: the ones that need the GPU; TEST_K= runs them all,
# the CPU emulator's and nvcc's too).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

step() { echo "== $1 ($(date -u +%T))"; }

step "device" | tee "$OUT/env.log"
{ nvidia-smi; $PY -c "import cupy, sys; d = cupy.cuda.runtime.getDeviceProperties(0); \
print(sys.version.split()[0], 'cupy', cupy.__version__, d['name'], \
'runtime', cupy.cuda.runtime.runtimeGetVersion(), 'driver', cupy.cuda.runtime.driverGetVersion())"
  command -v g++ nvcc; } >>"$OUT/env.log" 2>&1
cat "$OUT/env.log"

step "install (no dependencies, no network)"
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    tail -3 "$OUT/install.log"
    echo "pip could not install: importing from the source checkout instead"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step "GPU tests"
timeout "${TEST_S:-100}" $PY -m pytest -q -rs -p no:cacheprovider tests/test_cupy*.py \
    tests/test_gqa.py tests/test_generation.py \
    -k "${TEST_K-gpu}" 2>&1 | tee "$OUT/test_gpu.log"

step "benchmark: tensorc vs PyTorch eager"
timeout "${BENCH_S:-130}" $PY benchmarks/gpu.py --runs "${RUNS:-20}" --compile-models "" --profile \
    2>&1 | tee "$OUT/bench.log"

step "benchmark: torch.compile peer (fp32)"
timeout "${COMPILE_S:-80}" $PY benchmarks/gpu.py --runs "${RUNS:-20}" --models gpt \
    --precisions fp32 --no-attention 2>&1 | tee "$OUT/bench_compile.log"

step "generate (KV cache on the GPU)"
for model in gpt llama; do
    timeout "${GEN_S:-40}" $PY -c "import sys; from tensorc.cli import main; sys.exit(main())" \
        generate $model --preset small --backend cupy --ids 1,2,3,4,5,6,7,8 \
        --max-new-tokens 64 --format json 2>&1 | tail -c 400 | tee -a "$OUT/generate.log"
done

step "CLI"
timeout "${CLI_S:-40}" $PY -c "import sys; from tensorc.cli import main; sys.exit(main())" \
    compare gpt --preset small --seq 128 --backends numpy,cupy --passes O2 \
    2>&1 | tee "$OUT/cli.log"
step "done"
