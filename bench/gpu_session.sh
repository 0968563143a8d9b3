#!/usr/bin/env bash
# One call on a lent GPU machine (torch and Triton preinstalled, no network): set up, then run the named stages.
#   bench/gpu_session.sh STAGE...    from the repository root; logs under $OUT (else bench-out/gpu)
# Stages: env | build (CUDA extension for this GPU, also saved to $OUT for a later call to carry) | test
# (-m gpu over tests/) | sanitize (compute-sanitizer memcheck over every kernel, racecheck over the CUDA k-NN) |
# bench-lce | bench-info-nce | knn-tiers | knn-configs | bench-knn.
# Peers come as wheels in .whl/ (see bench/NOTES.md); a prebuilt extension can be carried in python/infofuse/.
set -u
export OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The extension is built ahead of time by the build stages (or carried); no stage may start a first-use build.
export INFOFUSE_NO_JIT=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SUMMARY=()
stage() {  # stage NAME TIMEOUT COMMAND...: run with a time limit, log to $OUT/NAME.log, remember the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/$name.log"
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  tail -n 25 "$OUT/$name.log"
}
build_extension() {  # editable install against the machine's torch, or a _C*.so carried from an earlier call's $OUT
  local so
  so=$(python3 -c "import sysconfig; print('python/infofuse/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ -f "$so" ] && [ "${FORCE_BUILD:-0}" = 0 ]; then
    echo "using the carried $so (no rebuild)"
    return 0
  fi
  INFOFUSE_CUDA_ARCHS=${INFOFUSE_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-8} \
    python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . && gzip -c "$so" >"$OUT/$(basename "$so").gz"
}
gpu_pytest() {  # gpu_pytest NAME LIMIT PER_TEST_TIMEOUT PYTEST_ARGS...: the gpu-marked tests in tests/, 4 workers
  local name=$1 limit=$2 per_test=$3; shift 3
  stage "$name" "$limit" python3 -m pytest -q -n 4 -p no:cacheprovider -o addopts="-ra" --timeout "$per_test" \
    --junitxml "$OUT/$name.xml" -m gpu tests/ "$@" ${TEST_ARGS:-}
}
export -f build_extension
# Without an install, the package layout of pyproject.toml by links (infofuse.bench, infofuse.triton_kernels)
[ -e python/infofuse/bench ] || ln -s ../../bench python/infofuse/bench
[ -e python/infofuse/triton_kernels ] || ln -s ../../triton_kernels python/infofuse/triton_kernels
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
for s in "$@"; do
  case $s in
    env)
      stage env 120 bash -c 'nvidia-smi; python3 -c "import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"; nvcc --version | tail -n 2; python3 -m pip list 2>/dev/null | grep -i -E "cut|liger|inf.cl|open.clip"' ;;
    build)
      stage build 480 bash -c build_extension
      python3 -c "import infofuse; print(infofuse._ext.build_info())" 2>&1 | tee -a "$OUT/build.log" ;;
    build-test)  # the build beside the tests that need no extension, then the k-NN tests that use it
      ( build_extension >"$OUT/build.log" 2>&1; echo "build rc=$?" >>"$OUT/build.log" ) &
      bp=$!
      gpu_pytest test-triton "${TEST_TIMEOUT:-330}" 240 -k "not knn"
      wait $bp
      tail -n 5 "$OUT/build.log"
      python3 -c "import infofuse; print(infofuse._ext.build_info())" 2>&1 | tee -a "$OUT/build.log"
      gpu_pytest test-knn "${TEST_TIMEOUT:-240}" 200 -k knn ;;
    test)
      gpu_pytest test "${TEST_TIMEOUT:-420}" 240 ;;
    sanitize)  # SMOKE_ONLY=lce|info_nce|knn narrows the memcheck run
      stage memcheck "${SAN_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m infofuse.bench.gpu_smoke \
        ${SMOKE_ONLY:+--only $SMOKE_ONLY}
      if python3 -c "import sys, infofuse; sys.exit(not infofuse._ext.build_info().get('cuda'))"; then
        stage racecheck "${SAN_TIMEOUT:-240}" compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m infofuse.bench.gpu_smoke \
          --only knn-cuda
      fi ;;
    bench-lce)
      stage bench-lce "${BENCH_TIMEOUT:-420}" python3 -m infofuse bench --op linear_cross_entropy --models gaussian,lm \
        --out "$OUT/bench" ${LCE_ARGS:-} ;;
    bench-info-nce)
      stage bench-info-nce "${BENCH_TIMEOUT:-420}" python3 -m infofuse bench --op info_nce --out "$OUT/bench" \
        ${INFO_NCE_ARGS:-} ;;
    knn-tiers)  # the Triton search's tiers and time on the data models of bench/knn_screening.py (its CPU model's table)
      stage knn-tiers "${TIERS_TIMEOUT:-300}" python3 -m infofuse.bench.knn_screening --gpu ${TIERS_ARGS:-} ;;
    knn-configs)  # the screening kernel timed in each of its configurations (prefetch or not, block shapes)
      stage knn-configs "${CONFIGS_TIMEOUT:-300}" python3 -m infofuse.bench.knn_screening --gpu --configs \
        --models gaussian ${CONFIGS_ARGS:-} ;;
    bench-knn)
      stage bench-knn "${BENCH_TIMEOUT:-420}" python3 -m infofuse bench --op knn_entropy --dtype float32 --reps 2 \
        --warmup 1 --ref-dtype none --out "$OUT/bench" ${KNN_ARGS:-} ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
printf '%s\n' "${SUMMARY[@]}"
