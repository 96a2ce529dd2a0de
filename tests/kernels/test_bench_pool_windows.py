"""bench/pool_windows.py on its smallest setting: the paired table of the overlapping-pool blocks is produced, its
correctness guard passes, and the JSON holds every block asked for."""

import json
import pathlib
import runpy

import torch


def test_pool_windows_bench_runs(tmp_path, capsys):
    bench = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[2] / "bench" / "pool_windows.py"))
    threads = torch.get_num_threads()
    try:
        args = ["--batch", "1", "--repeats", "1", "--warmup", "0", "--blocks", "alexnet-1,resnet-stem,L3"]
        assert bench["main"](args + ["--results", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| alexnet-1 |" in out and "| resnet-stem |" in out and "| L3 |" in out
    rows = json.loads((tmp_path / "pool_windows.json").read_text())["rows"]
    assert [r["block"] for r in rows] == ["alexnet-1", "resnet-stem", "L3"]
    for r in rows:
        for key in ("fwd_bwd", "render"):
            assert r[f"{key}_eager"]["median_ms"] > 0 and r[f"{key}_fused"]["median_ms"] > 0
            assert r[f"{key}_x"]["median"] > 0
