#!/usr/bin/env bash
# `make gpu-check`: attnfx's GPU checks as one prepared run of at most ~9 minutes, for a lent GPU
# machine with no network (torch, triton, transformers, pytest and hypothesis installed; nothing
# pip-installable). Each stage has a time cap and none starts past DEADLINE s, so the logs always
# come back. Without CUDA (CI's dry run) the tests are collected and skip (so a selection that
# matches nothing shows: pytest rc 5), the build and the benchmark are skipped, and it exits 0.
#
#   0 environment · 1 attnfx importable from src/ and attnfx._C built in the background (sm_90)
#   2 Triton kernels vs the fp32 reference (bf16, T=4096) · 3 one Inductor test of each kind
#   4 the C++/CUDA ops vs their references · 5 `bench/kernels.py --quick` (T 1k/4k/16k, no Flex)
#   6 the rest of tests/test_gpu.py while time lasts
#
# Output in $OUT (default bench/results/gpu-check): run.log, pytest.log, build.log and the
# benchmark's kernels_quick.{json,png} under $OUT/<device>/. Commit them under bench/results/<device>/.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu-check}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
START=$(date +%s); DEADLINE=${DEADLINE:-530}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
cap() { local c=$1 l; l=$(left); (( l < c )) && c=$l; (( c < 5 )) && c=5; echo "$c"; }
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
exec > >(tee -a "$OUT/run.log") 2>&1
# no pytest-timeout there: `timeout` caps each stage instead
ptest() { local c=$1; shift; timeout "$(cap "$c")" "$PY" -m pytest -q -rfEs -p no:cacheprovider "$@" \
            > "$OUT/pytest.part" 2>&1; echo "pytest rc=$? (5: nothing collected/selected)";
          cat "$OUT/pytest.part" >> "$OUT/pytest.log"
          grep -E "^(FAILED|ERROR)|passed|failed|error|skipped|deselected" "$OUT/pytest.part" | tail -30
          rm -f "$OUT/pytest.part"; }
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

stage "0 environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory >> 30, "GiB")
else:
    print("no CUDA device: every GPU stage below skips (a dry run)")
PY

stage "1 attnfx importable; attnfx._C built in the background"
if ! "$PY" -c "import attnfx" 2>/dev/null; then      # a bare checkout: src/ on the path
    echo "$PWD/src" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/attnfx_gpucheck.pth"
fi
BUILD_PID=
if [ "$CUDA" = 1 ]; then
    rm -f src/attnfx/_C*.so
    ( TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" \
      MAX_JOBS=16 timeout 300 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
      echo "build rc=$?" >> "$OUT/build.log" ) &
    BUILD_PID=$!
fi
"$PY" -c "import attnfx, attnfx.kernels.attention as a; print('attnfx from', attnfx.__file__, '| kernels from', a.__file__)"

stage "2 Triton kernels vs the fp32 reference: bf16, T=4096, d 64/128, causal and not, every extra + backward"
ptest 120 -m gpu -k triton_kernel tests/test_gpu.py

stage "3 one Inductor test of each kind (bf16 llama vs eager; generation; lowered; AttnLRP relevance)"
ptest 180 tests/test_gpu.py -k "matches_the_model and llama-dtype1 or generation or \
lowered_inductor_equals_the_model and llama or lrp_mode and llama"

stage "4 attnfx._C (wait for the build), then the CUDA ops against their references"
if [ -n "$BUILD_PID" ]; then
    timeout "$(cap 150)" tail --pid="$BUILD_PID" -f /dev/null; tail -2 "$OUT/build.log"
    grep -iE "warning|error" "$OUT/build.log" | head -10
    "$PY" -c "from attnfx.ops import _cpp; print('_C:', _cpp.missing() or 'loaded', '| CUDA kernels:', \
_cpp.has_kernels(['attention_stats', 'head_readout', 'head_contrib', 'lrp_act_backward', 'lrp_layer_norm_backward', \
'lrp_rms_norm_backward'], 'cuda'))"
fi
ptest 90 -m gpu -k cuda_kernel tests/test_attention_stats.py tests/test_attention_argmax.py tests/test_readout.py tests/test_lrp_rules.py

stage "5 kernel benchmark subset: bench/kernels.py --quick"
if [ "$CUDA" = 1 ]; then
    timeout "$(cap 150)" "$PY" bench/kernels.py --quick --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
    tail -20 "$OUT/bench.log"
else
    echo "skipped: no CUDA"
fi

stage "6 the rest of tests/test_gpu.py while time lasts"
ptest 300 tests/test_gpu.py -k "not triton_kernel and not (matches_the_model and llama-dtype1) and not \
generation and not (lowered_inductor_equals_the_model and llama) and not (lrp_mode and llama)"
stage "done"
exit 0
