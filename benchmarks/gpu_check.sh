#!/usr/bin/env bash
# One GPU sitting: versions, the GPU tests, the model, decode and kernel benchmarks, flex kernel options, and
# with two GPUs the FSDP2 tests and benchmark.
# Run from the repository root on the GPU machine: bash benchmarks/gpu_check.sh  (writes to $OUT or ./out)
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=.:tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, show its end
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $?"
}
# the compiled-decode tests compile every config afresh (12 minutes on an H200 one at a time): 4 processes share
# the GPU (pytest-xdist), and the long-sequence tests, which need tens of GiB each, run alone after them
[ -n "${SKIP_TESTS:-}" ] || { step gpu_tests 1800 python3 -m pytest -q tests/gpu -p no:cacheprovider -n 4 \
    -k "not long_sequences ${TESTS:+and $TESTS}"; grep -E "passed|failed|^E " "$OUT/gpu_tests.log" | tail -8
    step gpu_long_tests 600 python3 -m pytest -q tests/gpu -p no:cacheprovider -k long_sequences
    grep -E "passed|failed|^E " "$OUT/gpu_long_tests.log" | tail -8; }
[ -n "${SKIP_MODEL:-}" ] || { step model 300 python3 benchmarks/bench.py --skip-kernels --lengths ${LENGTHS:-16384 32768 65536 131072} \
    --out "$OUT/model.json" --plot "$OUT/speedup.png"; tail -28 "$OUT/model.log"; }
# the decode table's cudagraph_skips column counts compiled steps run without CUDA graphs; TORCH_LOGS=cudagraphs
# would say why, but on torch 2.11 its logger raised an AssertionError once a second cache size was compiled
# (each static row compiles afresh, about a minute each: the whole step takes 15-20 minutes)
[ -n "${SKIP_DECODE:-}" ] || { step decode 1500 python3 benchmarks/bench.py --skip-kernels --skip-model \
    --decode ${DECODE_LENGTHS:-4096 131072} --paths "unpatched, static" native "interleave 2, static" \
    "SWA (no FA decode), static" --e2e 131072 512 --e2e-paths unpatched "interleave 2, static" \
    "SWA (no FA decode), static" --out "$OUT/decode.json" --profile "$OUT/decode_profile.txt"; tail -24 "$OUT/decode.log"; }
# two GPUs: FSDP2 through accelerate against one GPU, and its speed and memory
[ -n "${SKIP_FSDP:-}" ] || [ "$(nvidia-smi -L | wc -l)" -lt 2 ] || {
    step fsdp_tests 600 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_fsdp_gpu.py tests/test_train.py \
        tests/gpu/test_backends_gpu.py -k "fsdp or two"; grep -E "passed|failed|^E " "$OUT/fsdp_tests.log" | tail -8
    step fsdp_speed 900 python3 benchmarks/fsdp_speed.py --json "$OUT/fsdp_speed.json"; tail -8 "$OUT/fsdp_speed.log"; }
[ -n "${SKIP_KERNELS:-}" ] || { step kernels 100 python3 benchmarks/bench.py --skip-model --lengths ${LENGTHS:-16384 32768 65536 131072} \
    --out "$OUT/kernels.json"; tail -32 "$OUT/kernels.log"; }
[ -n "${SKIP_TUNING:-}" ] || { step tuning 120 python3 benchmarks/flex_tuning.py --sections forward --json "$OUT/flex_tuning.json"
    grep "^|" "$OUT/tuning.log"; }
