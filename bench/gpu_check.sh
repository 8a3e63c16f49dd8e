#!/usr/bin/env bash
# The GPU check for the H100 test machine. Run from the repository root:
#
#     bash bench/gpu_check.sh
#
# 1. records the machine (nvidia-smi -q, pip list, versions, the checkout's commit and local changes);
# 2. installs missing wheels from ./wheels when that folder exists (the machine has no network);
# 3. installs this package (pip install --no-deps -e .) into a venv that sees the machine's packages;
# 4. checks every import the project uses and reports each missing one (required or optional);
# 5. runs the GPU tests (pytest -m gpu, JUnit XML) and the GPU benchmarks: SAR_CNN model-only sweep
#    (bench-b), Pipeline A model-only and end to end from PNG bytes (bench-a, bench-a-e2e), and
#    the Pipeline A builds with their parity gates (build-a).
#
# STEPS picks the steps (default: "tests bench-b build-a bench-a bench-a-e2e"); the device tool
# allows 10 minutes per call, so run them in separate calls, e.g.
#     STEPS=tests bash bench/gpu_check.sh;  STEPS="bench-b" BENCH_N=4096 bash bench/gpu_check.sh
#
# Everything goes to $OUT/gpu-<gpu>-<date>-<commit>/ (bench/results/... when $OUT is unset);
# SUMMARY.txt says what ran, what passed and what is missing. Nothing is skipped silently: a
# missing package is listed in missing.txt, and tests that need it report their skip reason.
# Exit status: 0 when every required package was present and every step passed, 1 otherwise.
#
# Knobs (environment): PYTHON (default python3), VENV (the venv to create or reuse, .venv-gpu), BENCH_BATCH_SIZES (1,8,64,512,1024,4096),
# BENCH_N (4096 images per pass), BENCH_RUNS (5), BENCH_WARMUP (2), STEP_TIMEOUT (seconds per
# step, 3600), IWS_INDUCTOR_MODE (torch.compile mode of the inductor backend; recorded in the
# results' backend info), WEIGHTS (SAR_CNN weights to benchmark; default: the embedded model, or
# random weights when this checkout has none), XGBOOST (Pipeline A's XGBoost model; default:
# ../shared/reference/iws-gmd-2026/models/pipeline_a_xgboost.json, else wheels/pipeline_a_xgboost.json),
# EVA_WEIGHTS (EVA02-L weights; default: random, which measures the same speed), A_BATCH_SIZES
# (Pipeline A model-only batch sizes, 1,16,64,128), A_E2E_BATCH_SIZES (end to end, 64,128), A_N
# (Pipeline A images per pass, 512), A_INDUCTOR_MODE (torch.compile mode for EVA02, "default":
# max-autotune spends many minutes per batch size on a 305 M-parameter model).
set -uo pipefail

STEPS=${STEPS:-tests bench-b build-a bench-a bench-a-e2e}
A_BATCH_SIZES=${A_BATCH_SIZES:-1,16,64,128}
A_N=${A_N:-512}
A_INDUCTOR_MODE=${A_INDUCTOR_MODE:-default}
wants() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

PYTHON=${PYTHON:-python3}
BENCH_BATCH_SIZES=${BENCH_BATCH_SIZES:-1,8,64,512,1024,4096}
BENCH_N=${BENCH_N:-4096}
BENCH_RUNS=${BENCH_RUNS:-5}
BENCH_WARMUP=${BENCH_WARMUP:-2}
STEP_TIMEOUT=${STEP_TIMEOUT:-3600}

if [ ! -f pyproject.toml ] || [ ! -d engine ]; then
    echo "gpu_check.sh: run me from the repository root (bash bench/gpu_check.sh)" >&2
    exit 2
fi

# ----------------------------------------------------------------------------- where results go
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu_slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
commit=$(git rev-parse --short=10 HEAD 2>/dev/null || echo no-git)
if [ "$commit" != no-git ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    commit="$commit-dirty"  # local changes: their diff is saved as git-diff.patch
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="${OUT:-bench/results}/gpu-$gpu_slug-$stamp-$commit"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/SUMMARY.txt"
: > "$SUMMARY"
: > "$RESULTS/missing.txt"
failures=0

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
fail() { say "FAIL: $*"; failures=$((failures + 1)); }
# run NAME CMD...: run a step with a time limit, log it to NAME.log, record its exit status
run() {
    local name=$1; shift
    printf '%s\n' "$*" >> "$RESULTS/commands.txt"
    timeout "$STEP_TIMEOUT" "$@" < /dev/null > "$RESULTS/$name.log" 2>&1
    local rc=$?
    printf '%s %s\n' "$name" "$rc" >> "$RESULTS/status.txt"
    return $rc
}

say "iws-engine GPU check — $stamp"
say "results: $RESULTS"
say "gpu: ${gpu_name:-none found by nvidia-smi}"
say "commit: $commit"

# ----------------------------------------------------------------------------- the machine
nvidia-smi -q > "$RESULTS/nvidia-smi-q.txt" 2>&1 || fail "nvidia-smi -q failed (see nvidia-smi-q.txt)"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
{ uname -a; echo; lscpu 2>/dev/null; echo; free -g 2>/dev/null; } > "$RESULTS/host.txt"
if [ "$commit" != no-git ]; then
    { git log -1 --format='%H %ad %s' --date=iso; echo; git status --short; } > "$RESULTS/git.txt" 2>&1
    git diff HEAD > "$RESULTS/git-diff.patch" 2>/dev/null || true
fi

# ----------------------------------------------------------------------------- python environment
# A venv with --system-site-packages sees the machine's torch/CUDA stack and keeps our editable
# install out of the system Python.
VENV=${VENV:-.venv-gpu}
if [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" > "$RESULTS/venv.log" 2>&1; then
    PY="$VENV/bin/python"
else
    say "note: cannot create a venv (see venv.log); installing into $PYTHON itself"
    PY=$PYTHON
    export PIP_BREAK_SYSTEM_PACKAGES=1
fi
say "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"

# import name | pip distribution | required or optional (what needs it)
PACKAGES="
torch|torch|required
numpy|numpy|required
PIL|pillow|required
cv2|opencv-python-headless|required
safetensors|safetensors|required
h5py|h5py|required
onnx|onnx|required
onnxruntime|onnxruntime|required
tqdm|tqdm|required
pytest|pytest|required
pytest_benchmark|pytest-benchmark|required
pynvml|nvidia-ml-py|required
triton|triton|required (inductor on CUDA)
cupy|cupy-cuda13x|required (GPU kernels)
onnxscript|onnxscript|optional (EVA02 ONNX export)
tensorrt|tensorrt-cu13|optional (tensorrt backend)
torch_tensorrt|torch-tensorrt|optional (torch-tensorrt backend)
xgboost|xgboost|optional (pipeline A stage 2)
sklearn|scikit-learn|optional (xgboost sklearn wrapper)
nvidia.nvcomp|nvidia-nvcomp-cu13|optional (GPU inflate)
nvidia.dali|nvidia-dali-cuda130|optional (DALI loader)
timm|timm|optional (EVA02 backbone)
"

import_status() {  # prints the version, or the import error's last line; exit status 1 when it fails
    "$PY" - "$1" <<'PYEOF' 2>&1 | tail -n 1
import importlib, sys
try:
    module = importlib.import_module(sys.argv[1])
except BaseException as e:  # ImportError, OSError (a missing shared library), anything else
    print(f"{type(e).__name__}: {e}".replace("\n", " "))
    sys.exit(1)
print(getattr(module, "__version__", "(no __version__)"))
PYEOF
}

say ""
say "== packages"
missing_required=0
while IFS='|' read -r module dist need; do
    [ -z "$module" ] && continue
    if version=$(import_status "$module"); then  # pipefail: the status is the import's
        say "  ok       $module $version"
        continue
    fi
    # torch must stay the machine's CUDA build: never replace it from wheels/
    if [ -d wheels ] && [ "$module" != torch ]; then
        if run "wheel-$dist" "$PY" -m pip install --no-index --find-links wheels "$dist" \
                && "$PY" -c "import $module" 2>/dev/null; then
            say "  ok       $module $(import_status "$module") (installed from wheels/)"
            continue
        fi
    fi
    say "  MISSING  $module ($dist, $need): $version"
    printf '%s\t%s\t%s\t%s\n' "$module" "$dist" "$need" "$version" >> "$RESULTS/missing.txt"
    case $need in required*) missing_required=$((missing_required + 1)) ;; esac
done <<< "$PACKAGES"
[ -d wheels ] || say "  (no wheels/ folder: nothing could be installed)"
[ "$missing_required" -gt 0 ] && fail "$missing_required required package(s) missing (missing.txt)"

# ----------------------------------------------------------------------------- the package
say ""
say "== install"
# without network the build backend (setuptools>=68, wheel) must come from this Python or from wheels/
if run install "$PY" -m pip install --no-deps --no-build-isolation -e .; then
    say "  ok       pip install --no-deps -e ."
elif [ -d wheels ] && run install-from-wheels "$PY" -m pip install --no-deps --no-index --find-links wheels -e .; then
    say "  ok       pip install --no-deps -e . (build backend from wheels/)"
else
    fail "pip install --no-deps -e .: $(grep -iE '^ *error' "$RESULTS/install.log" | tail -n 1 | sed 's/^ *//') — needs setuptools>=68 and wheel in $PY or in wheels/ (install.log)"
fi
"$PY" -m pip list > "$RESULTS/pip-list.txt" 2>&1 || "$PY" -m pip freeze > "$RESULTS/pip-list.txt" 2>&1
run info "$PY" -m iws_engine.cli info || fail "iws-engine info (info.log)"
if run cuda "$PY" -c "
import torch
assert torch.cuda.is_available(), 'torch.cuda.is_available() is False'
p = torch.cuda.get_device_properties(0)
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, '
      f'{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB')"; then
    say "  ok       $(tail -n 1 "$RESULTS/cuda.log")"
else
    fail "torch sees no CUDA device (cuda.log): the GPU tests and benchmarks cannot mean anything"
fi

# ----------------------------------------------------------------------------- GPU tests
if wants tests; then
say ""
say "== pytest -m gpu"
run pytest-gpu "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$RESULTS/pytest-gpu.xml"
rc=$?
say "  $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran' "$RESULTS/pytest-gpu.log" | tail -n 1)"
grep -E '^(SKIPPED|FAILED|ERROR)' "$RESULTS/pytest-gpu.log" | while IFS= read -r line; do say "  $line"; done
[ "$rc" -eq 0 ] || fail "pytest -m gpu exited $rc (pytest-gpu.log, pytest-gpu.xml)"
fi

# ----------------------------------------------------------------------------- GPU benchmarks
if "$PY" -m iws_engine.cli bench --help > /dev/null 2>&1; then
    BENCH=("$PY" -m iws_engine.cli bench)
elif "$PY" -c "import iws_engine.bench.bench_cmd" > /dev/null 2>&1; then
    BENCH=("$PY" -m iws_engine.bench.bench_cmd)
    say "  note: 'iws-engine bench' is not wired into the CLI yet; using python -m iws_engine.bench.bench_cmd"
else
    BENCH=()
    fail "no bench command: neither 'iws_engine.cli bench' nor iws_engine.bench.bench_cmd"
fi
WEIGHTS_ARGS=()
if [ -n "${WEIGHTS:-}" ]; then
    WEIGHTS_ARGS=(--weights "$WEIGHTS")
elif ! "$PY" -c "from iws_engine.export.weights import default_weights_path as p; assert p().is_file()" 2>/dev/null; then
    # throughput does not depend on the weights' values: random SAR_CNN weights measure the same thing
    if "$PY" - "$RESULTS/random-sarcnn.safetensors" > "$RESULTS/weights.log" 2>&1 <<'PYEOF'
import sys
import torch
from iws_engine.export import weights
from iws_engine.export.models.sarcnn import SarCNN, state_to_numpy
from iws_engine.preprocess import iws_sarcnn_spec
torch.manual_seed(0)
meta = weights.ModelMetadata(model="sarcnn", model_name="random", preprocess=iws_sarcnn_spec(0.38, 0.156),
                             threshold=0.5, trained=False)
weights.save(sys.argv[1], state_to_numpy(SarCNN().eval()), meta)
PYEOF
    then
        WEIGHTS_ARGS=(--weights "$RESULTS/random-sarcnn.safetensors")
        say "  note: no embedded default weights in this checkout; benchmarking random SAR_CNN weights"
    else
        fail "no default weights and random ones could not be made (weights.log)"
    fi
fi
if [ ${#BENCH[@]} -gt 0 ] && wants bench-b; then
    say ""
    say "== bench-b: SAR_CNN, model only"
    # tensorrt/torch-tensorrt are always asked for: where they are missing the results say so
    # ("not measured: ... is not installed") instead of the configuration silently vanishing
    if run bench "${BENCH[@]}" --mode model \
            --config torch:fp32:cuda --config torch:fp16:cuda \
            --config inductor:fp16:cuda --config inductor:bf16:cuda \
            --config tensorrt:fp16:cuda --config torch-tensorrt:fp16:cuda \
            --config onnxruntime:fp32 \
            --batch-sizes "$BENCH_BATCH_SIZES" --n "$BENCH_N" --runs "$BENCH_RUNS" --warmup "$BENCH_WARMUP" \
            ${WEIGHTS_ARGS[@]+"${WEIGHTS_ARGS[@]}"} -o "$RESULTS/bench" --report; then
        say "  ok       $(grep -E '^best ' "$RESULTS/bench.log" | tail -n 1)"
    else
        fail "bench (bench.log)"
    fi
    grep -E '^not measured:' "$RESULTS/bench.log" | while IFS= read -r line; do say "  $line"; done
fi

# ----------------------------------------------------------------------------- Pipeline A
XGBOOST=${XGBOOST:-}
if [ -z "$XGBOOST" ]; then
    for candidate in ../shared/reference/iws-gmd-2026/models/pipeline_a_xgboost.json wheels/pipeline_a_xgboost.json; do
        [ -f "$candidate" ] && XGBOOST=$candidate && break
    done
fi
A_MODEL=(--model eva02xgb --xgboost "$XGBOOST")
A_ENV=(env "IWS_INDUCTOR_MODE=$A_INDUCTOR_MODE")
[ -n "${EVA_WEIGHTS:-}" ] && A_MODEL+=(--weights "$EVA_WEIGHTS")
if wants build-a || wants bench-a || wants bench-a-e2e; then
    say ""
    if [ -z "$XGBOOST" ]; then
        fail "Pipeline A: no XGBoost model (set XGBOOST, or put pipeline_a_xgboost.json in wheels/)"
    else
        say "== Pipeline A (EVA02-L/14-448 + XGBoost: $XGBOOST${EVA_WEIGHTS:+, EVA02 weights $EVA_WEIGHTS})"
    fi
fi
if [ -n "$XGBOOST" ] && wants build-a; then
    # each build checks its artefact against fp32 eager on the GPU (parity gate on softmax features and
    # probabilities); a failed gate or a missing library fails only its own line
    for bp in inductor:bf16 inductor:fp16 tensorrt:fp16 tensorrt:fp8 onnxruntime:fp32; do
        backend=${bp%%:*}; precision=${bp##*:}
        device=cuda; [ "$backend" = onnxruntime ] && device=cpu
        if run "build-a-$backend-$precision" "${A_ENV[@]}" "$PY" -m iws_engine.cli build "${A_MODEL[@]}" --backend "$backend" \
                --precision "$precision" --device "$device" --batch 1:64:128 --probes 16 \
                -o "$RESULTS/artifacts/eva02xgb-$backend-$precision"; then
            say "  ok       build $bp: $(grep -E 'parity on' "$RESULTS/build-a-$backend-$precision.log" | tail -n 1)"
        else
            say "  not built $bp: $(grep -E 'iws-engine build:' "$RESULTS/build-a-$backend-$precision.log" | tail -n 1)"
        fi
    done
fi
if [ -n "$XGBOOST" ] && [ ${#BENCH[@]} -gt 0 ] && wants bench-a; then
    if run bench-a "${A_ENV[@]}" "${BENCH[@]}" "${A_MODEL[@]}" --mode model \
            --config torch:fp32:cuda --config torch:bf16:cuda \
            --config inductor:bf16:cuda --config inductor:fp16:cuda --config tensorrt:fp16:cuda \
            --batch-sizes "$A_BATCH_SIZES" --n "$A_N" --runs "$BENCH_RUNS" --warmup "$BENCH_WARMUP" \
            -o "$RESULTS/bench" --report; then
        say "  ok       bench-a (model only): $(grep -E '^best ' "$RESULTS/bench-a.log" | tail -n 1)"
    else
        fail "bench-a (bench-a.log)"
    fi
    grep -E '^not measured:' "$RESULTS/bench-a.log" | while IFS= read -r line; do say "  $line"; done
fi
if [ -n "$XGBOOST" ] && [ ${#BENCH[@]} -gt 0 ] && wants bench-a-e2e; then
    # from PNG bytes: eager fp32 (baseline), eager bf16, compiled bf16/fp16; CPU (Pillow) and GPU loaders
    if run bench-a-e2e "${A_ENV[@]}" "${BENCH[@]}" "${A_MODEL[@]}" --mode e2e \
            --config torch:fp32:cuda --config torch:bf16:cuda \
            --config inductor:bf16:cuda --config inductor:fp16:cuda --config inductor:bf16:cuda@gpu \
            --config tensorrt:fp16:cuda \
            --batch-sizes "${A_E2E_BATCH_SIZES:-64,128}" --n "$A_N" --runs "$BENCH_RUNS" --warmup "$BENCH_WARMUP" \
            -o "$RESULTS/bench" --report; then
        say "  ok       bench-a-e2e: $(grep -E '^best ' "$RESULTS/bench-a-e2e.log" | tail -n 1)"
    else
        fail "bench-a-e2e (bench-a-e2e.log)"
    fi
    grep -E '^not measured:' "$RESULTS/bench-a-e2e.log" | while IFS= read -r line; do say "  $line"; done
fi

# ----------------------------------------------------------------------------- verdict
say ""
if [ "$failures" -eq 0 ]; then
    say "RESULT: all steps passed"
else
    say "RESULT: $failures step(s) failed"
fi
say "optional packages missing: $(grep -c 'optional' "$RESULTS/missing.txt" || true) (missing.txt)"
[ "$failures" -eq 0 ]
