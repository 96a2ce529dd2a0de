"""The CPU benchmark script runs end to end (tiny batch) and writes what its table promises."""

import importlib.util
import json
import os

import pytest
import torch

import drmm_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_ops", os.path.join(ROOT, "bench", "cpu_ops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not drmm_kernels.available_backends()["cpu"], reason="cpu backend not built")
def test_cpu_ops_benchmark_runs_and_reports(tmp_path, monkeypatch, capsys):
    bench = _load_bench()
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert (
            bench.main(
                [
                    "--batch",
                    "2",
                    "--repeats",
                    "3",
                    "--warmup",
                    "0",
                    "--layers",
                    "2,5",
                    "--threads",
                    "1",
                    "--out",
                    "smoke",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide count
    out = capsys.readouterr().out
    assert "| L2 |" in out and "| L5 |" in out and "| L1 |" not in out
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["meta"]["allocator"] == "system"
    for r in data["results"]:
        for key in ("fwd", "fwd_bwd", "render"):
            q = r[f"{key}_pair_x"]
            assert 0 < q["q1"] <= q["median"] <= q["q3"]
            assert r[f"{key}_eager"]["faults"] >= 0 and r[f"{key}_cpu"]["faults"] >= 0
        assert 0 < r["saved_ratio"] < 1  # the fused op keeps uint8 switches, eager a float map
    assert [r["layer"] for r in data["bn_results"]] == ["L2", "L5"]
    for r in data["bn_results"]:
        q = r["bn_fwd_bwd_pair_x"]
        assert 0 < q["q1"] <= q["median"] <= q["q3"]
        assert 0 < r["bn_saved_cpu"] < r["bn_saved_eager"]
    assert (tmp_path / "smoke.md").read_text().count("| L") == 4  # both tables
