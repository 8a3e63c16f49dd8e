#!/usr/bin/env bash
# The GPU check: everything that needs a GPU, in ONE call of at most 8 minutes on an H100 (installs included).
# Run from the repository root:
#
#     bash bench/gpu_check.sh [--dry-run] [--out DIR] [--wheels DIR] [--xgboost FILE] [--budget SECONDS]
#                             [--steps "STEP ..."] [--list]
#
# Steps, in order (each with its own time limit; the whole run keeps within --budget, 480 s by default):
#   setup            machine record (nvidia-smi, host, git), a venv that sees the machine's packages, the wheels
#                    brought along (--wheels: installed --no-deps), this package (pip install -e .), an import table
#   gpu-tests        pytest -m gpu (JUnit XML): kernels, GPU loader (nvCOMP and host inflate), inductor CUDA graphs,
#                    Pipeline A on the device, GPU XGBoost
#   sarcnn-model     SAR_CNN model only: eager fp32/fp16 vs inductor fp16/bf16 (+ CUDA graphs), two batch sizes
#   e2e-loaders      SAR_CNN end to end from RGBA16 539x528 vignettes: the GPU loader vs the CPU loader
#   pipeline-a-tiny  Pipeline A end to end (tiny EVA02, GPU loader, GPU XGBoost), one batch size
#   pipeline-a-large Pipeline A model only (EVA02-L/14-448 eager bf16 + XGBoost), one batch size
#   xgboost-parity   GPU XGBoost == CPU XGBoost on 4,096 softmax-like feature vectors (Pipeline A's model)
#
# A step that fails, times out or cannot start does not stop the others. Everything goes to one folder,
# DIR/gpu-<gpu>-<UTC stamp>-<commit>/ (DIR: --out, else $OUT, else bench/results): SUMMARY.txt (what ran, how
# long, what passed), status.tsv (one row per step), commands.txt, one .log per step, the benchmarks' JSON and
# Markdown, pytest's XML. When $OUT is set (the device tool brings back at most 8 files), the folder is also packed
# into DIR/<folder>.tar.gz and SUMMARY.txt copied beside it.
#
# --dry-run goes through the whole script on any machine (arguments, folder, every step's bookkeeping) without
# running the steps' commands: each step is logged with the command and time limit it would get, and the clock
# advances by that limit, so a dry run shows that the plan fits the budget even if every step used all its time.
#
# Wheels to bring (no network there; the H100 image has torch+cu130, cupy, NVRTC, timm, onnxruntime, pytest):
# see README.md, "Development". Knobs (environment): PYTHON (python3), VENV (.venv-gpu), INDUCTOR_MODE (torch.compile
# mode for the inductor steps, "default": the CUDA default max-autotune-no-cudagraphs autotunes for minutes per
# shape), BENCH_BATCH_SIZES (64,1024), BENCH_N (4096), E2E_N (512), A_BATCH (16), A_N (64).
# Exit status: 0 when every selected step passed (or was planned, with --dry-run), 1 otherwise, 2 on bad arguments.
set -uo pipefail

ALL_STEPS="setup gpu-tests sarcnn-model e2e-loaders pipeline-a-tiny pipeline-a-large xgboost-parity"
declare -A LIMIT=([setup]=60 [gpu-tests]=150 [sarcnn-model]=90 [e2e-loaders]=60 [pipeline-a-tiny]=25
                  [pipeline-a-large]=55 [xgboost-parity]=20)
MIN_STEP_S=10   # a step is not started with less time than this left
RESERVE_S=10    # kept for the summary and the archive

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die_usage() { echo "gpu_check.sh: $*" >&2; usage >&2; exit 2; }

DRY_RUN=0
RESULTS_ROOT=${OUT:-bench/results}
WHEELS=""
XGBOOST=${XGBOOST:-}
BUDGET=480
STEPS=$ALL_STEPS
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] || die_usage "--out needs a folder"; RESULTS_ROOT=$2; shift ;;
        --wheels) [ $# -ge 2 ] || die_usage "--wheels needs a folder"; WHEELS=$2; shift ;;
        --xgboost) [ $# -ge 2 ] || die_usage "--xgboost needs a file"; XGBOOST=$2; shift ;;
        --budget) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || die_usage "--budget needs whole seconds"; BUDGET=$2; shift ;;
        --steps) [ $# -ge 2 ] || die_usage "--steps needs step names"; STEPS=$2; shift ;;
        --list) for s in $ALL_STEPS; do printf '%s\t%s s\n' "$s" "${LIMIT[$s]}"; done; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
    shift
done
for s in $STEPS; do
    [ -n "${LIMIT[$s]:-}" ] || die_usage "unknown step: $s (steps: $ALL_STEPS)"
done
if [ ! -f pyproject.toml ] || [ ! -d engine ]; then
    echo "gpu_check.sh: run me from the repository root (bash bench/gpu_check.sh)" >&2
    exit 2
fi
if [ -z "$WHEELS" ]; then
    for candidate in .whl wheels; do [ -d "$candidate" ] && WHEELS=$candidate && break; done
fi
if [ -z "$XGBOOST" ]; then
    for candidate in ../shared/reference/iws-gmd-2026/models/pipeline_a_xgboost.json \
                     ${WHEELS:+"$WHEELS/pipeline_a_xgboost.json"}; do
        [ -f "$candidate" ] && XGBOOST=$candidate && break
    done
fi
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
INDUCTOR_MODE=${INDUCTOR_MODE:-default}
BENCH_BATCH_SIZES=${BENCH_BATCH_SIZES:-64,1024}
BENCH_N=${BENCH_N:-4096}
E2E_N=${E2E_N:-512}
A_BATCH=${A_BATCH:-16}
A_N=${A_N:-64}
export IWS_INDUCTOR_MODE=$INDUCTOR_MODE PYTHONUNBUFFERED=1

# ----------------------------------------------------------------------------- the results folder
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu_slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
commit=$(git rev-parse --short=10 HEAD 2>/dev/null || echo no-git)
if [ "$commit" != no-git ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"  # local changes: their diff is saved as git-diff.patch
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
name="gpu-$gpu_slug-$stamp-$commit"
[ "$DRY_RUN" -eq 1 ] && name="$name-dry-run"
RESULTS="$RESULTS_ROOT/$name"
mkdir -p "$RESULTS" || { echo "gpu_check.sh: cannot create $RESULTS" >&2; exit 2; }
SUMMARY="$RESULTS/SUMMARY.txt"
: > "$SUMMARY"
printf 'step\tstatus\texit\tseconds\tlimit\n' > "$RESULTS/status.tsv"
: > "$RESULTS/commands.txt"

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

START=$SECONDS
SIMULATED=0  # dry run: seconds the steps would have taken at most
now() { echo $((SECONDS - START + SIMULATED)); }
failures=0

# step NAME CMD...: run one step within min(its limit, what the budget has left); log, time and record it.
step() {
    local step_name=$1; shift
    local log="$RESULTS/$step_name.log" left limit status rc=0 t0
    left=$((BUDGET - RESERVE_S - $(now)))
    limit=${LIMIT[$step_name]}
    [ "$left" -lt "$limit" ] && limit=$left
    printf '%s\t%s\n' "$step_name" "$*" >> "$RESULTS/commands.txt"
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        status="not run (out of time: ${left}s of the ${BUDGET}s budget left)"
        rc=-1
        echo "$status" > "$log"
    elif [ "$DRY_RUN" -eq 1 ]; then
        { printf 'dry run: would run with a %ss limit:\n%s\n' "$limit" "$*"; declare -f "$1"; } > "$log"
        if dry_check "$@" >> "$log" 2>&1; then
            status="planned (dry run)"
        else
            status="failed (dry run: its command does not parse; $step_name.log)"
            rc=2
        fi
        SIMULATED=$((SIMULATED + limit))
    else
        t0=$SECONDS
        # bash -c: the steps are functions of this script (exported below), which `timeout` cannot call directly
        timeout --kill-after=5 "$limit" bash -c '"$@"' step "$@" < /dev/null > "$log" 2>&1
        rc=$?
        if [ "$rc" -eq 0 ]; then status=passed
        elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timed out after ${limit}s"
        else status="failed (exit $rc)"; fi
        printf '# %s: %s in %ss\n' "$step_name" "$status" "$((SECONDS - t0))" >> "$log"
    fi
    case $status in passed|planned*) ;; *) failures=$((failures + 1)) ;; esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$step_name" "$status" "$rc" "$(( $(now) ))" "$limit" >> "$RESULTS/status.tsv"
    say "  $(printf '%-17s' "$step_name") $status  [$(now)s of ${BUDGET}s; $step_name.log]"
    [[ $status == passed || $status == planned* ]]
}
# dry_check CMD...: what a dry run can check of a step here: the bench options parse (iws-engine's own parser),
# the GPU tests collect
dry_check() {
    case $1 in
        bench) shift
               "$PYTHON" -c 'import sys; from iws_engine.cli import build_parser
args = build_parser().parse_args(["bench", *sys.argv[1:]])
print("options parse:", ", ".join(c.label for c in args.configs or []))' --idle-seconds 1 --runs 3 --warmup 1 \
                   -o "$RESULTS/bench" "$@" ;;
        gpu_tests) "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests | tail -n 1 ;;
        *) return 0 ;;
    esac
}
wants() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
# only STEP: record a step that was not selected
not_selected() { printf '%s\tnot selected\t-\t%s\t-\n' "$1" "$(now)" >> "$RESULTS/status.tsv"; say "  $(printf '%-17s' "$1") not selected"; }

say "iws-engine GPU check — $stamp${gpu_name:+ — $gpu_name}$([ "$DRY_RUN" -eq 1 ] && echo ' — DRY RUN (nothing executed)')"
say "results: $RESULTS"
say "commit: $commit; budget ${BUDGET}s; steps: $STEPS"
say "wheels: ${WHEELS:-none}; XGBoost model: ${XGBOOST:-none}; inductor mode: $INDUCTOR_MODE"
say ""

# ----------------------------------------------------------------------------- setup
PY="$VENV/bin/python"
setup() {
    set -e
    nvidia-smi -q > "$RESULTS/nvidia-smi-q.txt" 2>&1 || echo "nvidia-smi -q failed"
    { uname -a; lscpu 2>/dev/null; free -g 2>/dev/null; } > "$RESULTS/host.txt" 2>&1 || true
    if [ "$commit" != no-git ]; then
        { git log -1 --format='%H %ad %s' --date=iso; git status --short; } > "$RESULTS/git.txt" 2>&1 || true
        git diff HEAD > "$RESULTS/git-diff.patch" 2>/dev/null || true
    fi
    [ -x "$PY" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
    if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    "$PY" -m pip list > "$RESULTS/pip-list.txt" 2>&1 || true
    "$PY" - <<'PYEOF'
import importlib
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
for module in ("cupy", "nvidia.nvcomp", "xgboost", "triton", "timm", "onnxruntime", "tensorrt", "nvidia.dali", "pynvml"):
    try:
        version = getattr(importlib.import_module(module), "__version__", "?")
        print(f"  ok       {module} {version}")
    except Exception as e:  # ImportError, or OSError for a missing shared library
        print(f"  MISSING  {module}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
PYEOF
}

# the steps' commands (functions, so that a dry run logs them without running them)
gpu_tests() { "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$RESULTS/pytest-gpu.xml" tests; }
bench() { "$PY" -m iws_engine.cli bench --idle-seconds 1 --runs 3 --warmup 1 -o "$RESULTS/bench" "$@"; }
xgboost_parity() {
    "$PY" - "$XGBOOST" <<'PYEOF'
import sys
import cupy
import numpy as np
from iws_engine.xgboost_stage import XGBoostStage, cuda_unavailable_reason
reason = cuda_unavailable_reason()
assert reason is None, f"GPU XGBoost unavailable: {reason}"
rng = np.random.default_rng(0)
logits = rng.normal(0, 3, (4096, 1000)).astype(np.float32)
features = np.exp(logits - logits.max(1, keepdims=True))
features /= features.sum(1, keepdims=True)  # softmax-like, as EVA02's head gives
cpu = XGBoostStage(sys.argv[1], device="cpu").predict(features)
gpu = cupy.asnumpy(XGBoostStage(sys.argv[1], device="cuda").predict(cupy.asarray(features)))
diff = float(np.max(np.abs(gpu - cpu)))
decisions = int(np.sum((gpu >= 0.5) != (cpu >= 0.5)))
print(f"max |GPU - CPU| = {diff:.3g} over {len(cpu)} vectors; {decisions} decisions differ")
assert diff <= 1e-6 and decisions == 0
PYEOF
}

export -f setup gpu_tests bench xgboost_parity
export PY PYTHON VENV WHEELS RESULTS XGBOOST commit

run_or_skip() {  # run_or_skip STEP CMD...: the step when selected, else a "not selected" row
    local step_name=$1; shift
    if wants "$step_name"; then step "$step_name" "$@"; else not_selected "$step_name"; fi
}

say "== steps"
run_or_skip setup setup
if [ "$DRY_RUN" -eq 0 ] && [ ! -x "$PY" ]; then  # no venv: the steps still run, and their logs say what is missing
    PY=$PYTHON
    export PY
    say "  note: no venv at $VENV (setup.log); the steps use $PYTHON"
fi
if [ "$DRY_RUN" -eq 0 ] && [ -f "$RESULTS/setup.log" ]; then sed 's/^/    /' "$RESULTS/setup.log" | tail -n 12 >> "$SUMMARY"; fi
run_or_skip gpu-tests gpu_tests
run_or_skip sarcnn-model bench --mode model --batch-sizes "$BENCH_BATCH_SIZES" --n "$BENCH_N" \
    --config torch:fp32:cuda --config torch:fp16:cuda --config inductor:fp16:cuda --config inductor:bf16:cuda
run_or_skip e2e-loaders bench --mode e2e --format rgba16 --size 539x528 --batch-sizes 64 --n "$E2E_N" \
    --config torch:fp16:cuda@gpu --config torch:fp16:cuda@cpu
A_MODEL=(--model eva02xgb --xgboost "${XGBOOST:-missing-pipeline_a_xgboost.json}")
run_or_skip pipeline-a-tiny bench "${A_MODEL[@]}" --eva-config tiny --mode e2e --batch-sizes "$A_BATCH" --n "$A_N" \
    --config torch:bf16:cuda@gpu
run_or_skip pipeline-a-large bench "${A_MODEL[@]}" --eva-config large --mode model --batch-sizes "$A_BATCH" --n "$A_N" \
    --config torch:bf16:cuda
run_or_skip xgboost-parity xgboost_parity

# ----------------------------------------------------------------------------- summary
say ""
if [ "$DRY_RUN" -eq 0 ]; then
    [ -f "$RESULTS/gpu-tests.log" ] && say "pytest: $(grep -E '[0-9]+ (passed|failed)' "$RESULTS/gpu-tests.log" | tail -n 1)"
    for f in "$RESULTS"/*.log; do grep -hE '^(best |not measured:|max \|GPU)' "$f" 2>/dev/null | sed "s|^|$(basename "$f" .log): |"; done \
        | tee -a "$SUMMARY"
fi
if [ "$failures" -eq 0 ]; then
    say "RESULT: every selected step $([ "$DRY_RUN" -eq 1 ] && echo 'planned' || echo 'passed') in $(now)s of ${BUDGET}s"
else
    say "RESULT: $failures step(s) did not pass ($(now)s of ${BUDGET}s); see status.tsv and the logs"
fi
if [ -n "${OUT:-}" ] && [ "$RESULTS_ROOT" = "$OUT" ]; then  # the device tool brings back few files: pack the folder
    tar -C "$RESULTS_ROOT" -czf "$RESULTS_ROOT/$name.tar.gz" "$name" && cp "$SUMMARY" "$RESULTS_ROOT/SUMMARY.txt"
fi
[ "$failures" -eq 0 ]
