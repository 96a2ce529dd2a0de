"""bench/device_check.sh without a GPU: its plan, its argument errors and the pre-flight stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def run(*args, env=None, timeout=120):
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )


def plan(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("plan ")]
    stages = {}
    for ln in lines:
        m = re.fullmatch(r"plan (\w+): (\d+) s", ln)
        assert m, f"plan line not in the form 'plan <stage>: <N> s': {ln!r}"
        stages[m.group(1)] = int(m.group(2))
    return stages


def test_plan_fits_the_gpu_budget():
    r = run("--list")
    assert r.returncode == 0, r.stderr
    stages = plan(r.stdout)
    assert list(stages) == ["preflight", "triton", "cuda", "memcheck", "bench", "total"]
    assert stages["total"] == sum(v for k, v in stages.items() if k != "total")
    assert stages["total"] <= 420
    assert r.stdout.startswith("plan preflight:"), "the plan must come first"


def test_only_selects_stages_and_bad_usage_exits_2():
    r = run("--only", "cuda", "--list")
    assert r.returncode == 0
    assert list(plan(r.stdout)) == ["preflight", "cuda", "total"]
    bad = run("--only", "nosuch")
    assert bad.returncode == 2 and "unknown stage 'nosuch'" in bad.stderr
    assert run("--frobnicate").returncode == 2


def test_preflight_overrides_an_old_arch_list_and_writes_the_summary(tmp_path):
    # --only with no stage besides pre-flight: no build, no tests; seconds.
    out = tmp_path / "out"
    r = run("--dry-run", "--only", "preflight", env=dict(OUT=str(out), TORCH_CUDA_ARCH_LIST="7.5"))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "TORCH_CUDA_ARCH_LIST was '7.5': replaced by" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["stage"] for s in summary["stages"]] == ["preflight"]
    assert summary["stages"][0]["status"] == "passed"
    assert summary["env"]["torch"]
    assert (out / "device_check.log").exists()
