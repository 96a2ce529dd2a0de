#!/usr/bin/env bash
# The one prepared GPU check for drmm_kernels: is every Triton and CUDA kernel right, then how fast.
#
#   bash bench/device_check.sh [--dry-run] [--only STAGE[,STAGE...]] [--list]
#
# Stages, in order, each time-boxed (the plan with each budget is printed first; total <= 420 s on
# one H200 with 16 cores):
#   preflight  tools and versions, TORCH_CUDA_ARCH_LIST, `pip install --no-deps --no-build-isolation -e .`
#              (metadata only) and the extension build started in the background (log: build.log)
#   triton     every Triton test (compiled GPU tests and the interpreter-sized ones alike) from the
#              source tree, autotuning off, sharded over parallel pytest processes, junit XML
#   cuda       waits for the build (capped), installs the built extension, every CUDA-backend test,
#              --maxfail bounded, junit XML
#   memcheck   compute-sanitizer memcheck per backend (bench/device/memcheck_case.py) with the caching
#              allocator off: one case per kernel family in fp64, fp32 without TF32, fp32 TF32, bf16
#   bench      bench/kernels.py --quick at batch 256, fp32: eager vs triton vs cuda for the fused
#              forward, render and forward+backward (autotuning off, so compile time stays bounded)
#
# Results go to $OUT (default bench/results/device-<stamp>/): summary.json (rewritten after every
# stage and on exit, so a killed run still returns every finished stage), device_check.log (the raw
# log), build.log, install.log, junit-*.xml, memcheck-*.log, bench-quick-<layer>.{json,md}.
#
#   --dry-run   for a machine without a GPU (CI): runs preflight, the build and the Triton tests under
#               the interpreter, checks the memcheck script on the CPU backends, skips the rest with
#               a line saying why; exit 0 when everything it ran passed
#   --only S    run only these stages (preflight always runs; the build only when a stage needs it),
#               to rerun what failed in the time that is left
#   --list      print the plan and exit
#
# Exit status: 0 every stage that ran passed, 1 a stage failed or timed out, 2 bad usage.
# The python on PATH is used ($PYTHON overrides). Environment: MAX_JOBS (build parallelism),
# DRMM_CHECK_SHARDS (parallel pytest processes, default 4).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
ALL_STAGES=(preflight triton cuda memcheck bench)
declare -A BUDGET=([preflight]=20 [triton]=150 [cuda]=80 [memcheck]=90 [bench]=80)

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0 LIST=0 ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) shift; ONLY=${1:-}; [[ -n $ONLY ]] || { echo "device_check.sh: error: --only needs a stage name" >&2; exit 2; } ;;
    --only=*) ONLY=${1#--only=} ;;
    --list) LIST=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check.sh: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SELECTED=(preflight)
if [[ -n $ONLY ]]; then
  IFS=, read -r -a want <<< "$ONLY"
  for s in "${want[@]}"; do
    [[ -n ${BUDGET[$s]:-} ]] || { echo "device_check.sh: error: --only: unknown stage '$s' (one of ${ALL_STAGES[*]})" >&2; exit 2; }
  done
  for s in "${ALL_STAGES[@]:1}"; do
    for w in "${want[@]}"; do [[ $w == "$s" ]] && SELECTED+=("$s") && break; done
  done
else
  SELECTED=("${ALL_STAGES[@]}")
fi
selected() { local s; for s in "${SELECTED[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

# ------------------------------------------------------------------------------------------ plan
total=0
for s in "${SELECTED[@]}"; do echo "plan $s: ${BUDGET[$s]} s"; total=$((total + BUDGET[$s])); done
echo "plan total: $total s"
[[ $LIST == 1 ]] && exit 0

PY=${PYTHON:-$(command -v python || command -v python3)}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$REPO/bench/results/device-$STAMP}
mkdir -p "$OUT" || { echo "device_check.sh: error: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
BUILD_DIR=$REPO/build/device-check   # kept between calls on a warm machine: the rebuild is incremental
exec > >(tee -a "$OUT/device_check.log") 2>&1
# The budgets are for the 16-core GPU machine; a dry run on a 2-core CPU runs the Triton kernels in
# the interpreter and builds on 2 cores, so its time boxes are scaled.
SCALE=1
[[ $DRY == 1 ]] && SCALE=${DRMM_CHECK_DRY_SCALE:-4}
SHARDS=${DRMM_CHECK_SHARDS:-4}
[[ $DRY == 1 ]] && SHARDS=1
T0=$SECONDS
export DRMM_TRITON_AUTOTUNE=0   # correctness first: one config per kernel keeps compile time bounded
export DRMM_JIT=0   # the extension is built below, out of tree: no first-use build (drmm_kernels/jit.py) meanwhile
echo "### drmm device check $STAMP (dry_run=$DRY, stages: ${SELECTED[*]}) in $REPO -> $OUT"

# ------------------------------------------------------------------------------------ bookkeeping
# One line per stage in stages.tsv: name, status, exit code, seconds, budget, note.
STAGES_TSV=$OUT/stages.tsv
: > "$STAGES_TSV"
CURRENT="" CURRENT_T0=0 FAILED=0 BUILD_PID=""
record() {  # record NAME STATUS RC SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${BUDGET[$1]}" "${5//$'\t'/ }" >> "$STAGES_TSV"
  [[ $2 == failed || $2 == timeout || $2 == killed ]] && FAILED=1
  write_summary
}
write_summary() {
  "$PY" - "$OUT" "$STAGES_TSV" "$DRY" "$CURRENT" "$STAMP" <<'EOF' 2>/dev/null || echo "(summary.json not written: python failed; stages.tsv has the results)"
import glob, json, os, sys, xml.etree.ElementTree as ET
out, tsv, dry, current, stamp = sys.argv[1:6]
stages = []
for line in open(tsv):
    name, status, rc, secs, budget, note = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
    st = dict(stage=name, status=status, exit=int(rc) if rc.lstrip("-").isdigit() else rc,
              seconds=int(secs or 0), budget_s=int(budget or 0), note=note)
    xmls = sorted(glob.glob(os.path.join(out, f"junit-{name}*.xml")))
    if xmls:
        tot = dict(tests=0, failures=0, errors=0, skipped=0)
        failed = []
        for path in xmls:
            try:
                root = ET.parse(path).getroot()
            except ET.ParseError:
                continue
            for suite in (root.iter("testsuite")):
                for k in tot:
                    tot[k] += int(suite.get(k, 0))
                for case in suite.iter("testcase"):
                    if case.find("failure") is not None or case.find("error") is not None:
                        failed.append(f"{case.get('classname')}::{case.get('name')}")
        st["tests"] = tot
        st["failed_tests"] = failed[:200]
    stages.append(st)
env = {}
if os.path.exists(os.path.join(out, "env.json")):
    env = json.load(open(os.path.join(out, "env.json")))
install_status = os.path.join(out, "install.status")
if os.path.exists(install_status):
    env["install"] = open(install_status).read().strip()
summary = dict(stamp=stamp, dry_run=dry == "1", env=env, stages=stages, running=current or None,
               ok=all(s["status"] in ("passed", "skipped") for s in stages))
tmp = os.path.join(out, "summary.json.tmp")
json.dump(summary, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
EOF
}
on_exit() {
  local rc=$?
  if [[ -n $CURRENT ]]; then
    record "$CURRENT" killed "$rc" $((SECONDS - CURRENT_T0)) "the script was interrupted in this stage"
  fi
  [[ -n $BUILD_PID ]] && kill "$BUILD_PID" 2>/dev/null
  CURRENT=""; write_summary
  rm -rf "$WORK"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

begin() { CURRENT=$1; CURRENT_T0=$SECONDS; echo; echo "=== [$1] $(date +%T) budget ${BUDGET[$1]} s (x$SCALE)"; write_summary; }
finish() {  # finish STATUS RC NOTE
  local name=$CURRENT secs=$((SECONDS - CURRENT_T0))
  CURRENT=""
  echo "=== [$name] $1 (exit $2) after $secs s${3:+: $3}"
  record "$name" "$1" "$2" "$secs" "${3:-}"
}
skip() { echo; echo "=== [$1] skipped: $2"; record "$1" skipped 0 0 "$2"; }
left() { echo $(( BUDGET[$CURRENT] * SCALE - (SECONDS - CURRENT_T0) )); }
status_of() {  # exit code of a time-boxed command -> status word
  case $1 in 0) echo passed ;; 124|137) echo timeout ;; *) echo failed ;; esac
}

# Kernel tests: tests/kernels/ops (every layer of each op) and tests/kernels/backends (backend quirks). The backend
# markers of tests/conftest.py select them: -m triton (interpreter-sized and GPU ones), -m cuda.
kernel_tests() { ls -d tests/kernels/ops tests/kernels/backends; }

# pytest over shards: sharded_pytest STAGE MARKER EXTRA_ARGS... ; node ids are dealt round-robin to
# $SHARDS processes that share Triton's on-disk cache; each writes junit-STAGE-<i>.xml.
sharded_pytest() {
  local stage=$1 marker=$2; shift 2
  local ids=$WORK/$stage.ids files
  mapfile -t files < <(kernel_tests)
  "$PY" -m pytest -q -p no:cacheprovider --collect-only "${files[@]}" -m "$marker" \
    2>"$WORK/$stage.collect.err" | grep '::' > "$ids"
  local n
  n=$(wc -l < "$ids")
  if [[ $n == 0 ]]; then
    echo "no tests collected for -m '$marker':"; tail -n 20 "$WORK/$stage.collect.err"; return 5
  fi
  local k=$SHARDS; (( n < k )) && k=$n
  echo "$n tests in $k shard(s)"
  local pids=() i rc=0 budget
  budget=$(left)
  for ((i = 0; i < k; i++)); do
    local shard_ids
    mapfile -t shard_ids < <(awk -v k="$k" -v i="$i" 'NR % k == i' "$ids")
    timeout --kill-after=10 "$budget" "$PY" -m pytest -q -p no:cacheprovider -rfE "$@" \
      --junitxml="$OUT/junit-$stage-$i.xml" "${shard_ids[@]}" > "$OUT/pytest-$stage-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    local r=0
    wait "${pids[$i]}" || r=$?
    echo "--- shard $i: exit $r; $(tail -n 1 "$OUT/pytest-$stage-$i.log")"
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest-$stage-$i.log" | head -n 40
    if [[ $r == 124 || $r == 137 ]]; then rc=124; elif [[ $r != 0 && $rc == 0 ]]; then rc=$r; fi
  done
  return $rc
}

# ------------------------------------------------------------------------------------- preflight
begin preflight
GPU_OK=0
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } \
  || echo "nvidia-smi: not available"
"$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys
env = {"python": platform.python_version()}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:
    env["torch"] = f"not importable: {exc}"
for mod in ("triton", "setuptools", "wheel", "pytest", "numpy", "hypothesis", "ninja"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception:
        env[mod] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(" | ".join(f"{k} {v}" for k, v in env.items()))
EOF
if [[ $("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) == 1 ]]; then GPU_OK=1; fi
# CUDA_HOME: as given, else the toolkit in /usr/local/cuda, else from nvcc on PATH (which may be a
# wrapper script or a link elsewhere, so the toolkit folder is preferred)
if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then NVCC=$CUDA_HOME/bin/nvcc
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc
elif command -v nvcc >/dev/null; then NVCC=$(readlink -f "$(command -v nvcc)")
else NVCC=""; fi
[[ -n $NVCC ]] && echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*'))" || echo "nvcc: not found (the CUDA kernels cannot be built)"
export CUDA_HOME=${CUDA_HOME:-$([[ -n $NVCC ]] && dirname "$(dirname "$NVCC")")}
command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not on PATH (the build falls back to slow serial compiles)"
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
[[ -x $SAN ]] && echo "compute-sanitizer: $SAN" || { echo "compute-sanitizer: not found"; SAN=""; }
PREFLIGHT_NOTE="" PREFLIGHT_WARN=""
"$PY" -c "import pytest" 2>/dev/null || PREFLIGHT_NOTE+="pytest is not importable ($("$PY" -c "import pytest" 2>&1 | tail -n 1)); "

# The WMMA kernels need sm_80 or newer: an inherited TORCH_CUDA_ARCH_LIST with an older arch breaks
# the build, so the list is set from the visible GPU (9.0a for an H100/H200), or 9.0a without one.
ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(0); print(f'{M}.{m}' + ('a' if (M, m) == (9, 0) else ''))" 2>/dev/null || echo 9.0a)
[[ $GPU_OK == 1 ]] || ARCH=9.0a
if [[ -n ${TORCH_CUDA_ARCH_LIST:-} && $TORCH_CUDA_ARCH_LIST != "$ARCH" ]]; then
  echo "TORCH_CUDA_ARCH_LIST was '$TORCH_CUDA_ARCH_LIST': replaced by $ARCH"
fi
export TORCH_CUDA_ARCH_LIST=$ARCH
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
# pip's CUDA 13 wheels keep some headers (cccl) in nvidia/cu13/include
CU13=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null || true)
[[ -n $CU13 && -d $CU13 ]] && export CPATH=$CU13${CPATH:+:$CPATH}

# Everything runs from the source tree; hypothesis may be missing on the GPU machine: a stub then
# skips the property tests (loudly) and lets the rest run.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import hypothesis" 2>/dev/null; then
  echo "!!! hypothesis is not installed: @given property tests are SKIPPED (stub in $WORK/stub)"
  PREFLIGHT_WARN+="hypothesis missing: property tests skipped; "
  mkdir -p "$WORK/stub/hypothesis"
  cp "$REPO/bench/device/hypothesis_stub.py" "$WORK/stub/hypothesis/__init__.py"
  printf 'import sys\nfrom hypothesis import strategies as _s\nsys.modules[__name__] = _s\n' > "$WORK/stub/hypothesis/strategies.py"
  export PYTHONPATH=$WORK/stub:$PYTHONPATH
fi

# Triton < 3.7's interpreter converts 1-element arrays with int(), which NumPy >= 2.4 refuses: every
# kernel with a runtime loop bound then fails under TRITON_INTERPRET=1 (compiled runs are unaffected).
if [[ $DRY == 1 ]] && ! "$PY" -c "
import sys, numpy, triton
old_triton = tuple(int(v) for v in triton.__version__.split('.')[:2]) < (3, 7)
new_numpy = tuple(int(v) for v in numpy.__version__.split('.')[:2]) >= (2, 4)
sys.exit(1 if old_triton and new_numpy else 0)" 2>/dev/null; then
  PREFLIGHT_NOTE+="triton $("$PY" -c 'import triton; print(triton.__version__)')'s interpreter needs numpy < 2.4 (pip install 'numpy<2.4'); "
fi

NEED_BUILD=0
for s in cuda memcheck bench; do selected "$s" && NEED_BUILD=1; done
if [[ $NEED_BUILD == 1 ]]; then
  # Metadata-only editable install (fast, proves pip + the installed setuptools accept the project),
  # then the extension built out of tree and moved into place atomically when a stage needs it, so
  # no test process ever maps a half-written .so.
  mkdir -p "$BUILD_DIR"
  JOBS=${MAX_JOBS:-$(( $(nproc) > 4 ? $(nproc) - 4 : $(nproc) ))}
  (
    # An old setuptools without the `wheel` package cannot build PEP 660 editable wheels
    # ("invalid command 'bdist_wheel'"); `setup.py develop` needs neither and installs the same links.
    if DRMM_NO_EXTENSION=1 "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
      echo "pip install --no-deps --no-build-isolation -e . (metadata only): ok" > "$OUT/install.status"
    else
      why=$(grep -m1 -E 'error: [^s]' "$OUT/install.log" | sed 's/^ *//')
      if DRMM_NO_EXTENSION=1 "$PY" setup.py develop --no-deps >> "$OUT/install.log" 2>&1; then
        echo "pip install -e failed (${why:-see install.log}); setup.py develop --no-deps: ok" > "$OUT/install.status"
      else
        echo "pip install -e failed (${why:-see install.log}); setup.py develop --no-deps failed too" > "$OUT/install.status"
      fi
    fi
    MAX_JOBS=$JOBS "$PY" setup.py build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/tmp" > "$OUT/build.log" 2>&1
    echo $? > "$BUILD_DIR/rc"
  ) &
  BUILD_PID=$!
  rm -f "$BUILD_DIR/rc"
  echo "build started in the background (pid $BUILD_PID, MAX_JOBS=$JOBS): $OUT/build.log"
fi
if [[ -n $PREFLIGHT_NOTE ]]; then finish failed 1 "$PREFLIGHT_NOTE$PREFLIGHT_WARN"; else finish passed 0 "$PREFLIGHT_WARN"; fi

# ---------------------------------------------------------------------------------------- triton
if selected triton; then
  begin triton
  if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1; note="interpreter (dry run)"
  elif [[ $GPU_OK == 1 ]]; then
    unset TRITON_INTERPRET
    note="compiled on $("$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('device'))" "$OUT/env.json" 2>/dev/null)"
  fi
  if [[ $DRY == 0 && $GPU_OK == 0 ]]; then
    finish failed 1 "torch sees no CUDA device; use --dry-run on a machine without a GPU"
  else
    rc=0 warm=""
    if [[ $GPU_OK == 1 ]]; then
      # The memcheck case without the sanitizer, beside the tests: a value check of every kernel
      # family at 4 precisions, and it fills Triton's cache for the memcheck stage.
      timeout "$(left)" "$PY" bench/device/memcheck_case.py triton > "$OUT/memcheck-triton-plain.log" 2>&1 &
      warm=$!
    fi
    sharded_pytest triton triton || rc=$?
    if [[ -n $warm ]]; then
      r=0; wait "$warm" || r=$?
      echo "--- memcheck_case.py triton (no sanitizer): exit $r; $(tail -n 1 "$OUT/memcheck-triton-plain.log")"
      [[ $r != 0 && $rc == 0 ]] && rc=$r
    fi
    finish "$(status_of $rc)" "$rc" "$note, autotuning off"
  fi
  unset TRITON_INTERPRET
fi

# Wait for the background build (at most WAIT s), then move the extension into the source tree.
BUILD_STATE=""
await_build() {
  local wait=$1
  [[ -n $BUILD_STATE ]] && return
  [[ -n $BUILD_PID ]] || { BUILD_STATE="not started"; return; }
  local t=$SECONDS
  while [[ ! -f $BUILD_DIR/rc ]] && (( SECONDS - t < wait )) && kill -0 "$BUILD_PID" 2>/dev/null; do sleep 2; done
  if [[ ! -f $BUILD_DIR/rc ]]; then
    BUILD_STATE="build still running after a ${wait} s wait"; return
  fi
  local rc
  rc=$(cat "$BUILD_DIR/rc")
  BUILD_PID=""
  if [[ $rc != 0 ]]; then
    BUILD_STATE="build failed (exit $rc), see build.log"; tail -n 30 "$OUT/build.log"; return
  fi
  local so
  so=$(find "$BUILD_DIR/lib/drmm_kernels" -maxdepth 1 -name '_C*.so' | head -n 1)
  [[ -n $so ]] || { BUILD_STATE="build produced no drmm_kernels/_C*.so"; return; }
  cp "$so" "$REPO/drmm_kernels/.$(basename "$so").new" && mv -f "$REPO/drmm_kernels/.$(basename "$so").new" "$REPO/drmm_kernels/$(basename "$so")"
  BUILD_STATE=ok
  echo "install: $(cat "$OUT/install.status" 2>/dev/null)"
  echo "extension built in $(grep -c . "$OUT/build.log") log lines; installed $(basename "$so")"
  "$PY" -c "import drmm_kernels as dk; [print(f'  backend {k}: {v.available} ({v.reason})') for k, v in dk.available_backends().items()]"
}
backend_ok() { "$PY" -c "import drmm_kernels as dk, sys; sys.exit(0 if dk.available_backends()['$1'].available else 1)" 2>/dev/null; }

# ------------------------------------------------------------------------------------------ cuda
if selected cuda; then
  begin cuda
  # On the GPU machine the build has had the Triton stage's time on 12 cores; a dry run on a small,
  # busy CPU machine builds from scratch on 2 cores, so it waits longer (its point is correctness).
  if [[ $DRY == 1 ]]; then await_build "${DRMM_CHECK_DRY_BUILD_WAIT:-1500}"; else await_build $(( $(left) - 40 )); fi
  if [[ $BUILD_STATE != ok ]]; then
    finish failed 1 "$BUILD_STATE"
  elif [[ $DRY == 1 ]]; then
    if "$PY" -c "import drmm_kernels as dk, sys; sys.exit(0 if dk.available_backends()['cpu'].available else 1)" && \
       { [[ -z $NVCC ]] || "$PY" -c "import torch, drmm_kernels._C, sys; sys.exit(0 if torch.ops.drmm_C.built_with_cuda() else 1)"; }; then
      finish skipped 0 "dry run: the extension built and loads$([[ -n $NVCC ]] && echo ' with its CUDA kernels'); no GPU to run them"
    else
      finish failed 1 "dry run: the built extension does not load, or lacks its CUDA kernels"
    fi
  elif ! backend_ok cuda; then
    finish failed 1 "cuda backend unavailable after the build: $("$PY" -c "import drmm_kernels as dk; print(dk.available_backends()['cuda'].reason)" 2>&1 | tail -n 1)"
  else
    rc=0
    sharded_pytest cuda cuda --maxfail=20 || rc=$?
    finish "$(status_of $rc)" "$rc"
  fi
fi

# -------------------------------------------------------------------------------------- memcheck
if selected memcheck; then
  begin memcheck
  await_build $(( $(left) - 30 ))
  if [[ $DRY == 1 ]]; then
    # No sanitizer without a GPU: check that the case script itself runs (cpu backend, and the
    # Triton kernels in the interpreter, fp64 + exact fp32 to keep it short).
    rc=0 notes=""
    if [[ $BUILD_STATE == ok ]]; then
      timeout "$(left)" "$PY" bench/device/memcheck_case.py cpu --device cpu > "$OUT/memcheck-cpu.log" 2>&1 || rc=$?
      notes+="cpu: exit $rc; "
    fi
    r=0
    TRITON_INTERPRET=1 timeout "$(left)" "$PY" bench/device/memcheck_case.py triton --device cpu \
      --precisions fp64,fp32-exact > "$OUT/memcheck-triton.log" 2>&1 || r=$?
    notes+="triton (interpreter): exit $r"; [[ $r != 0 && $rc == 0 ]] && rc=$r
    tail -n 1 "$OUT"/memcheck-*.log
    if [[ $rc == 0 ]]; then finish skipped 0 "dry run: no GPU for compute-sanitizer; the case script passed on CPU ($notes)"
    else finish "$(status_of $rc)" "$rc" "dry run: the case script failed on CPU ($notes)"; fi
  elif [[ -z $SAN ]]; then
    finish failed 1 "compute-sanitizer not found"
  else
    rc=0 notes=""
    for b in cuda triton; do
      if ! backend_ok "$b"; then notes+="$b unavailable; "; rc=1; continue; fi
      r=0
      # cuda gets a third of what is left (its kernels are prebuilt), triton the rest (it may still
      # compile a few variants); the caching allocator off so every tensor is its own
      # allocation (an out-of-bounds access inside a cached block would go unseen).
      share=$(left); [[ $b == cuda ]] && share=$(( share / 3 ))
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=5 "$share" \
        "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 "$PY" bench/device/memcheck_case.py "$b" \
        > "$OUT/memcheck-$b.log" 2>&1 || r=$?
      echo "--- memcheck $b: exit $r"; grep -E 'ERROR SUMMARY|MISMATCH|NOT FINITE|memcheck_case' "$OUT/memcheck-$b.log" | tail -n 8
      notes+="$b: exit $r$([[ $r == 99 ]] && echo ' (memory errors)'); "
      if [[ $r == 124 || $r == 137 ]]; then rc=124; elif [[ $r != 0 && $rc == 0 ]]; then rc=$r; fi
    done
    finish "$(status_of $rc)" "$rc" "$notes"
  fi
fi

# ----------------------------------------------------------------------------------------- bench
if selected bench; then
  begin bench
  await_build $(( $(left) - 40 ))
  if [[ $DRY == 1 || $GPU_OK == 0 ]]; then
    finish skipped 0 "no GPU: the kernel benchmark needs one"
  else
    backends=triton; backend_ok cuda && backends+=",cuda"
    layers=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import kernels; print(' '.join(kernels.QUICK_LAYERS))")
    # One process per layer, each writing its own JSON, so a time-out keeps the finished layers.
    rc=0 done_layers=""
    for layer in $layers; do
      r=0
      timeout --kill-after=10 "$(left)" "$PY" bench/kernels.py --quick --layers "$layer" --batch 256 --dtype fp32 \
        --backends "$backends" --no-compile --out "$OUT" --name "bench-quick-$layer" || r=$?
      [[ $r == 0 ]] && done_layers+="$layer "
      if [[ $r != 0 ]]; then rc=$r; break; fi
    done
    finish "$(status_of $rc)" "$rc" "layers done: ${done_layers:-none}; backends $backends + eager, fp32 (TF32 as F.conv2d), batch 256, autotuning off"
  fi
fi

# --------------------------------------------------------------------------------------- summary
echo
echo "### stages (name status exit seconds budget note):"
column -t -s $'\t' "$STAGES_TSV" 2>/dev/null || cat "$STAGES_TSV"
echo "### total $((SECONDS - T0)) s; results in $OUT (summary.json)"
if [[ $FAILED != 0 ]]; then echo "### device check FAILED"; exit 1; fi
echo "### device check passed"
exit 0
