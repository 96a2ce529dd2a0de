#!/usr/bin/env bash
# The one prepared GPU check for drmm_kernels (target: under 5 minutes on an H100).
#
#   bash bench/device_check.sh [--full] [--no-build] [--no-sanitizer]
#
# 1. prints nvidia-smi and the versions of python/torch/triton/nvcc;
# 2. installs the package (pip install --no-deps --no-build-isolation -e .), timed; if building the
#    CUDA extension fails it reinstalls with DRMM_NO_EXTENSION=1 so Triton is still checked, and the
#    failure is recorded (exit code 3 when that is the only problem);
# 3. pytest -m gpu -x -q (all GPU tests, autotuned Triton kernels), then tests/test_triton.py compiled
#    on the GPU (TRITON_INTERPRET unset; one autotune config to keep compile time down);
# 4. bench/kernels.py --check on a short selection (3 pooled layers, batch 256, fp32 + bf16), then
#    torch.compile(mode="max-autotune") for the forward of one layer;
# 5. compute-sanitizer memcheck on one small case of every CUDA-backend primitive (when the cuda
#    backend is available) and of every Triton primitive.
# Everything (json, md, the raw log) goes to bench/results/<gpu>-<date>.{json,md,log} and, when $OUT
# is set, to $OUT as well. Exit status: 0 all good, 1 a wrong result or failed step, 3 only the
# CUDA extension build failed.
#
# --full: the whole sweep (all layers, batch 256 and 1024, max-autotune for every op); takes long.
#
# Not `set -e` semantics for the steps: every step runs under `step`, which records its status so one
# failure does not hide the results of the others; -e/-u/pipefail still guard the script's own logic.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
FULL=0 BUILD=1 SANITIZE=1
for arg in "$@"; do
  case "$arg" in
    --full) FULL=1 ;;
    --no-build) BUILD=0 ;;
    --no-sanitizer) SANITIZE=0 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-$(command -v python || command -v python3)}
unset TRITON_INTERPRET  # the kernels must run compiled here
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//' || true)
GPU=${GPU:-nogpu}
STAMP=$(date +%Y%m%d-%H%M%S)
RES=bench/results
mkdir -p "$RES"
NAME="$GPU-$STAMP"
STEM="$RES/$NAME"
LOGS=("$STEM.log")
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; LOGS+=("$OUT/$NAME.log"); fi
exec > >(tee -a "${LOGS[@]}") 2>&1
TMP=$(mktemp -d)
START=$SECONDS

STEPS=()
FAIL=0
BUILD_FAIL=0
# step NAME TIMEOUT_S CMD... : run, time and record one step; never aborts the script.
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo
  echo "=== [$name] $(date +%T) (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  echo "=== [$name] exit $rc after $((SECONDS - t0)) s"
  STEPS+=("$name|$rc|$((SECONDS - t0))")
  return "$rc"
}

echo "### drmm device check $NAME (full=$FULL) in $(pwd)"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("torch sees no CUDA device")
EOF
if [[ $("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0) != 1 ]]; then
  echo "!!! torch sees no CUDA device: the GPU tests below would only be skipped"
  FAIL=1
fi
(command -v nvcc >/dev/null && nvcc --version | tail -n2) || echo "nvcc not on PATH"
command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja not on PATH"

# --------------------------------------------------------------------------- install
if [[ $BUILD == 1 ]]; then
  if ! step install-with-extension 420 "$PY" -m pip install --no-deps --no-build-isolation -e .; then
    BUILD_FAIL=1
    echo "!!! building drmm_kernels._C failed; continuing without the extension (Triton is still checked)"
    export DRMM_NO_EXTENSION=1
    step install-no-extension 180 "$PY" -m pip install --no-deps --no-build-isolation -e . || FAIL=1
  fi
fi
"$PY" -c "import drmm_kernels as dk; [print(f'backend {k}: {v.available} ({v.reason})') for k, v in dk.available_backends().items()]" \
  || { echo "!!! drmm_kernels does not import"; FAIL=1; }
CUDA_BACKEND=$("$PY" -c "import drmm_kernels as dk; print(int(dk.available_backends()['cuda'].available))" 2>/dev/null || echo 0)

# --------------------------------------------------------------------------- tests
# tests/conftest.py and tests/test_ops.py import hypothesis; without it (the GPU image may lack it)
# a stub on PYTHONPATH lets every other test run and skips the property tests, loudly.
PYTEST_ENV=()
if ! "$PY" -c "import hypothesis" 2>/dev/null; then
  echo "!!! hypothesis is not installed: using a stub; @given property tests are SKIPPED"
  mkdir -p "$TMP/stub/hypothesis"
  cat > "$TMP/stub/hypothesis/__init__.py" <<'EOF'
"""Stand-in for hypothesis on machines without it: property tests are skipped, the rest runs."""
import pytest


class _Any:
    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return self

    def __or__(self, other):
        return self


class settings:
    def __init__(self, *a, **k):
        pass

    def __call__(self, fn):
        return fn

    @staticmethod
    def register_profile(*a, **k):
        pass

    @staticmethod
    def load_profile(*a, **k):
        pass


def given(*a, **k):
    return pytest.mark.skip(reason="hypothesis not installed on this machine")


def assume(*a, **k):
    return True


def example(*a, **k):
    return lambda fn: fn


strategies = _Any()
HealthCheck = _Any()
EOF
  printf 'import sys\nfrom hypothesis import strategies as _s\nsys.modules[__name__] = _s\n' > "$TMP/stub/hypothesis/strategies.py"
  PYTEST_ENV=(env "PYTHONPATH=$TMP/stub${PYTHONPATH:+:$PYTHONPATH}")
fi

step pytest-gpu 240 ${PYTEST_ENV[@]+"${PYTEST_ENV[@]}"} "$PY" -m pytest -m gpu -x -q -p no:cacheprovider || FAIL=1
step pytest-triton-compiled 180 ${PYTEST_ENV[@]+"${PYTEST_ENV[@]}"} env DRMM_TRITON_AUTOTUNE=0 \
  "$PY" -m pytest tests/test_triton.py -m "not gpu" -x -q -p no:cacheprovider || FAIL=1

# --------------------------------------------------------------------------- benchmark + check
if [[ $FULL == 1 ]]; then
  step bench-full 7200 "$PY" bench/kernels.py --check --layers all --batch 256,1024 --dtype fp32,bf16 \
    --max-autotune --out "$RES" --name "$NAME" || FAIL=1
else
  step bench-quick 200 "$PY" bench/kernels.py --quick --check --layers mnist.L1,cifar.L3,cifar.L6 \
    --batch 256 --dtype fp32,bf16 --out "$RES" --name "$NAME" || FAIL=1
  step bench-max-autotune 150 "$PY" bench/kernels.py --quick --layers cifar.L3 --batch 256 --dtype fp32,bf16 \
    --ops fwd --backends triton --no-compile --max-autotune --out "$RES" --name "$NAME-maxautotune" || FAIL=1
fi

# --------------------------------------------------------------------------- memcheck
if [[ $SANITIZE == 1 ]]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  cat > "$TMP/memcheck_case.py" <<'EOF'
"""One small case of every primitive of one backend, checked against the reference (exit 1 on mismatch)."""
import importlib
import sys

import torch

from drmm_kernels import backends, reference

name = sys.argv[1]
mod = importlib.import_module(backends._MODULES[name])
bad = 0
for dtype, tol in ((torch.float32, 1e-2), (torch.bfloat16, 3e-2)):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    for (cin, cout, k, pad, stride, pool) in ((8, 16, 3, 1, 1, 2), (1, 20, 5, 4, 2, 2), (24, 10, 1, 0, 1, 1)):
        x, w, sc, sh = r(2, cin, 11, 9), r(cout, cin, k, k), r(cout), r(cout)
        args = (stride, pad, pool)
        y, sw = mod.conv_relu_pool(x, w, sc, sh, *args, 0.1) if hasattr(mod, "conv_relu_pool") else \
            reference.conv_relu_pool(x, w, sc, sh, *args, 0.1)
        mu = r(*y.shape)
        z = torch.nn.functional.conv2d(x, w, None, stride, pad)
        calls = {
            "conv_relu_pool": lambda: (mod.conv_relu_pool(x, w, sc, sh, *args, 0.1)[0],
                                       reference.conv_relu_pool(x.double(), w.double(), sc.double(), sh.double(),
                                                                *args, 0.1)[0]),
            "render": lambda: (mod.render(mu, sw, w, sc, *args, (11, 9), 0.1),
                               reference.render(mu.double(), sw, w.double(), sc.double(), *args, (11, 9), 0.1)),
            "gather_conv": lambda: (mod.gather_conv(x, w, sw, *args),
                                    reference.gather_conv(x.double(), w.double(), sw, *args)),
            "render_wgrad": lambda: (mod.render_wgrad(x, mu, sw, sc, *args, 0.1, (k, k)),
                                     reference.render_wgrad(x.double(), mu.double(), sw, sc.double(), *args, 0.1,
                                                            (k, k))),
            "bn_pool": lambda: (mod.bn_pool(z, sc, sh, pool, 0.1)[0],
                                reference.bn_pool(z.double(), sc.double(), sh.double(), pool, 0.1)[0]),
        }
        for op, fn in calls.items():
            if not hasattr(mod, op):
                continue
            got, exp = fn()
            torch.cuda.synchronize()
            err = ((got.double() - exp).abs().max() / exp.abs().max().clamp_min(1e-6)).item()
            ok = err < tol
            bad += not ok
            print(f"{name} {op} {dtype} cin={cin} k={k}: rel err {err:.1e} {'ok' if ok else 'MISMATCH'}")
sys.exit(1 if bad else 0)
EOF
  if [[ -x "$SAN" ]] || command -v "$SAN" >/dev/null 2>&1; then
    if [[ $CUDA_BACKEND == 1 ]]; then
      step memcheck-cuda 150 "$SAN" --tool memcheck --error-exitcode 99 "$PY" "$TMP/memcheck_case.py" cuda || FAIL=1
    else
      echo "cuda backend not available: no memcheck of the CUDA kernels"
    fi
    step memcheck-triton 150 env DRMM_TRITON_AUTOTUNE=0 "$SAN" --tool memcheck --error-exitcode 99 \
      "$PY" "$TMP/memcheck_case.py" triton || FAIL=1
  else
    echo "compute-sanitizer not found: memcheck skipped"
  fi
fi

# --------------------------------------------------------------------------- summary
echo
echo "### steps (name|exit|seconds):"
printf '  %s\n' "${STEPS[@]}"
echo "### total $((SECONDS - START)) s; fail=$FAIL build_fail=$BUILD_FAIL"
"$PY" - "$STEM" "$FAIL" "$BUILD_FAIL" "${STEPS[@]}" <<'EOF' || FAIL=1
import json, os, sys
stem, fail, build_fail, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rows = [dict(zip(("step", "exit", "seconds"), s.split("|"))) for s in steps]
data = {}
if os.path.exists(stem + ".json"):
    data = json.load(open(stem + ".json"))
extra = stem + "-maxautotune.json"
if os.path.exists(extra):
    data.setdefault("rows", []).extend(json.load(open(extra)).get("rows", []))
data["device_check"] = dict(steps=rows, wrong_or_failed=bool(fail), extension_build_failed=bool(build_fail))
json.dump(data, open(stem + ".json", "w"), indent=1, default=str)
md = open(stem + ".md").read() if os.path.exists(stem + ".md") else "# drmm device check\n"
if os.path.exists(stem + "-maxautotune.md"):
    md += "\n## torch.compile max-autotune (forward)\n\n" + open(stem + "-maxautotune.md").read()
md += "\n## Device check steps\n\n| step | exit | s |\n|---|---|---|\n"
md += "".join(f"| {r['step']} | {r['exit']} | {r['seconds']} |\n" for r in rows)
md += f"\nResult: {'FAILED' if fail else 'ok'}" + (" (CUDA extension build failed)" if build_fail else "") + "\n"
open(stem + ".md", "w").write(md)
print("wrote", stem + ".json", stem + ".md")
EOF
if [[ -n "${OUT:-}" ]]; then
  cp -f "$STEM".json "$STEM".md "$OUT"/ 2>/dev/null || true
  cp -f "$STEM"-maxautotune.* "$OUT"/ 2>/dev/null || true
fi
rm -rf "$TMP"
if [[ $FAIL != 0 ]]; then
  echo "### device check FAILED"
  exit 1
elif [[ $BUILD_FAIL != 0 ]]; then
  echo "### device check: results ok, but the CUDA extension did not build"
  exit 3
fi
echo "### device check passed"
