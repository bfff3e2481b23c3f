#!/usr/bin/env bash
# Every GPU figure the speed work reports (docs/speed.md, benchmarks/RESULTS.md), in parts that
# each fit in under ten minutes on one H100/H200, so a short device lease can run them one by one.
# The table of issue 13 is: compare (TNO pair and 256x256 batch 16 against the authors' modules),
# throughput (the same with the analytic TFLOP/s and % of peak), sizes (largest pair, up to 4096),
# train (stage-1 and stage-2 MFU by the analytic count) and folder (compilations for the TNO folder).
#
#   OUT=gpu_results bash benchmarks/gpu_suite.sh kernel    # env, kernel tests compiled for the GPU, caim_kernel.py
#   OUT=gpu_results bash benchmarks/gpu_suite.sh compare   # compare_torch.py: 576x768x1, 256x256x1, 256x256x16
#   OUT=gpu_results bash benchmarks/gpu_suite.sh throughput  # fuse_throughput.py: TNO and 256x256 b16, fp32/bf16, attention impls
#   OUT=gpu_results bash benchmarks/gpu_suite.sh sizes     # fuse_throughput.py: largest pair per CAIM path, up to 4096x4096
#   OUT=gpu_results bash benchmarks/gpu_suite.sh train     # train_throughput.py: both stages, width 32, batch 16, 256, bf16
#   OUT=gpu_results bash benchmarks/gpu_suite.sh folder    # bucket_policy.py: TNO folder, --max-buckets 0 vs 3
#   OUT=gpu_results bash benchmarks/gpu_suite.sh ddfm      # ddfm_throughput.py: s per TNO pair, both priors, fp32/bf16
#   OUT=gpu_results bash benchmarks/gpu_suite.sh all
#
# Needs one Python with CUDA builds of jax and torch (PYTHON, default python3) and this package's
# dependencies importable (pip install -e . or PYTHONPATH; on the lent device machine, carry
# ml-collections, grain, tensorboardX, array-record and portpicker as wheels: see docs/speed.md).
# Writes OUT/<part>.log (everything printed) and OUT/<part>.json (all figures of the part), so a part
# yields two files. A failing step (or one over STEP_TIMEOUT seconds, default 400) is logged and the
# part goes on; the exit status is the number of failed steps. CAIM_IMPL=reference (or pallas) forces
# CAIM's implementation in the compare and throughput parts (default: auto, the kernel on GPU).
# FUSE_ARGS is appended to every fuse_throughput.py call (last wins), e.g. for a CPU smoke test of
# the plumbing: PYTHON=.venv/bin/python FUSE_ARGS="--width 8 --size 64x64 --batch 1 --iters 1" ... throughput
# DDFM_ARGS does the same for the ddfm part (e.g. "--size 64x64 --guided-config configs/ddfm_tiny.py --timed-steps 1 --iters 1").
set -uo pipefail

part=${1:-all}
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
CAIM=(${CAIM_IMPL:+--caim-impl "$CAIM_IMPL"})
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/parts"
exec > >(tee -a "$OUT/$part.log") 2>&1
failed=0

step() {  # step NAME CMD...: runs CMD, appends its output to the part's log, counts failures
  local name=$1; shift
  echo "=== [$part] $name: $*"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-400}" "$@" 2>&1 | grep -v -E "^(WARNING: All log messages|I0000|W0000)"
  local rc=${PIPESTATUS[0]}
  echo "=== [$part] $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

env_report() {
  "$PY" - <<'EOF'
import platform, shutil, subprocess
import jax, jaxlib
print("python", platform.python_version(), "| jax", jax.__version__, "| jaxlib", jaxlib.__version__)
print("devices", jax.devices())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
except ImportError:
    print("torch: not importable")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True).stdout)
else:
    print("nvidia-smi: not found")
EOF
}

merge_json() {  # merge_json PART: OUT/parts/*.json -> OUT/PART.json
  "$PY" - "$OUT" "$1" <<'EOF'
import json, os, sys
out, part = sys.argv[1], sys.argv[2]
folder = os.path.join(out, "parts")
merged = {}
for name in sorted(os.listdir(folder)):
    if name.startswith(part + "_") and name.endswith(".json"):
        with open(os.path.join(folder, name)) as f:
            merged[name[len(part) + 1:-5]] = json.load(f)
        os.remove(os.path.join(folder, name))
tmp = os.path.join(out, f".{part}.json.tmp")
with open(tmp, "w") as f:
    json.dump(merged, f, indent=2)
os.replace(tmp, os.path.join(out, f"{part}.json"))
print(f"wrote {os.path.join(out, part + '.json')}: {sorted(merged)}")
EOF
}

fuse() {  # fuse NAME ARGS...: one fuse_throughput.py run, figures to OUT/parts/PART_NAME.json
  local name=$1; shift
  # shellcheck disable=SC2086  # FUSE_ARGS is a list of words
  step "fuse_$name" "$PY" "$HERE/benchmarks/fuse_throughput.py" --json "$OUT/parts/${part}_$name.json" "$@" ${FUSE_ARGS:-}
}

run_kernel() {
  step env env_report
  # On a GPU these tests also compile the six Triton kernels for real (interpret mode only on CPU).
  step kernel_tests "$PY" -m pytest -q -p no:cacheprovider "$HERE/tests/test_criss_cross_pallas.py"
  step caim_kernel "$PY" "$HERE/benchmarks/caim_kernel.py" --json "$OUT/parts/kernel_caim.json"
  step model_memory "$PY" "$HERE/benchmarks/caim_kernel.py" --skip-kernel-table \
    --model-sizes 576x768,1024x1024,1536x1536,2048x2048,2560x2560 --json "$OUT/parts/kernel_model_memory.json"
}

run_compare() {
  step compare_torch "$PY" "$HERE/benchmarks/compare_torch.py" --iters 20 "${CAIM[@]}" --json "$OUT/parts/compare_torch.json"
}

run_throughput() {
  # GFLOP/pair, TFLOP/s and % of peak come from the analytic count (dmfuse_jax.flops), as on every backend.
  fuse tno_fp32 --dtype float32 --iters 20 "${CAIM[@]}"
  fuse tno_bf16 --dtype bfloat16 --iters 20 "${CAIM[@]}"
  fuse tno_bf16_cudnn --dtype bfloat16 --attention-impl cudnn --iters 20 "${CAIM[@]}"
  fuse 256_b16_bf16 --dtype bfloat16 --size 256x256 --batch 16 --iters 20 "${CAIM[@]}"
  fuse 256_b16_bf16_cudnn --dtype bfloat16 --attention-impl cudnn --size 256x256 --batch 16 --iters 20 "${CAIM[@]}"
  fuse 256_b16_fp32 --dtype float32 --size 256x256 --batch 16 --iters 20 "${CAIM[@]}"
}

run_sizes() {
  # Largest image per CAIM path, bf16 (the serving setting), one pair; a failure here is a finding.
  # Above 8192 attention tokens (1448x1448 and up) the UNet's 'xla' attention runs query-chunked.
  for s in 2048 3072 4096; do fuse "pallas_${s}" --dtype bfloat16 --size "${s}x${s}" --caim-impl pallas --iters 2; done
  fuse pallas_4096_cudnn --dtype bfloat16 --size 4096x4096 --caim-impl pallas --attention-impl cudnn --iters 2
  for s in 1024 1280 1536; do fuse "reference_${s}" --dtype bfloat16 --size "${s}x${s}" --caim-impl reference --iters 2; done
}

run_train() {
  # MFU by the analytic count of the step (forward + backward as traced); stage 1 is the issue's target.
  for dt in bfloat16 float32; do
    step "train_$dt" "$PY" "$HERE/benchmarks/train_throughput.py" --stage both --width 32 --batch 16 --size 256 \
      --dtype "$dt" --steps 10 --json "$OUT/parts/train_$dt.json"
  done
}

run_folder() {
  # The TNO folder (25 pairs, 11 sizes) with the bundled default model: compilations, compile and fuse
  # seconds, and PSNR of the 3-bucket policy against one bucket per 64-rounded size (and against a seed change).
  step bucket_policy "$PY" "$HERE/benchmarks/bucket_policy.py" --policies 0,3,1 --json "$OUT/parts/folder_buckets.json"
}

run_ddfm() {
  # DDFM (issue 14's target: the authors' full-size prior in at most 3 s per TNO pair on an H100, 100
  # steps): 10 timed steps per call, 2 calls, at TNO size; the PyTorch row runs on the CPU, so not here.
  for dt in float32 bfloat16; do
    # shellcheck disable=SC2086  # DDFM_ARGS is a list of words
    step "ddfm_$dt" "$PY" "$HERE/benchmarks/ddfm_throughput.py" --rows jax-sr3,jax-guided --size 576x768 \
      --timed-steps 10 --iters 2 --dtype "$dt" --json "$OUT/parts/ddfm_$dt.json" ${DDFM_ARGS:-}
  done
}

case "$part" in
  kernel) run_kernel; merge_json kernel ;;
  compare) run_compare; merge_json compare ;;
  throughput) run_throughput; merge_json throughput ;;
  sizes) run_sizes; merge_json sizes ;;
  train) run_train; merge_json train ;;
  folder) run_folder; merge_json folder ;;
  ddfm) run_ddfm; merge_json ddfm ;;
  all) for p in kernel compare throughput sizes train folder ddfm; do part=$p; "run_$p"; merge_json "$p"; done ;;
  *) echo "usage: gpu_suite.sh kernel|compare|throughput|sizes|train|folder|ddfm|all" >&2; exit 2 ;;
esac
echo "failed steps: $failed"
exit "$failed"
