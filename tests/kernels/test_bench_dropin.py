"""bench/dropin.py (fused vs unfused torchvision VGGs; docs/benchmarks.md) runs: ``--quick``, one round of every
case at tiny sizes, the table and the JSON written, the fused results equal to the unfused / Captum ones."""

from __future__ import annotations

import json
import math
import pathlib
import runpy

import torch

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "dropin.py"


def test_dropin_quick(tmp_path, capsys):
    bench = runpy.run_path(str(BENCH))
    threads = torch.get_num_threads()
    try:
        assert bench["main"](["--quick", "--out", str(tmp_path / "dropin")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "dropin.json").read_text())["rows"]
    assert (tmp_path / "dropin.md").read_text().count("| vgg") == len(rows)

    expected = [("inference", "vgg16_bn", None, None), ("train", "vgg16_bn", None, None)]
    expected += [
        ("attr", model, mode, way)
        for model in bench["ATTR_MODELS"]
        for _ in bench["SIZES"]["quick"]["attr"]
        for mode in bench["MODES"]
        for way in bench["WAYS"]
    ]
    assert [(r["kind"], r["model"], r.get("mode"), r.get("way")) for r in rows] == expected
    for r in rows:
        assert f"| {r['case']} |" in out, r["case"]
        for key in ("unfused_ms", "fused_ms", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
        assert r["target"] == bench["TARGETS"][r["kind"]]
        # fused logits / loss and gradients / attribution maps against the unfused model's (or Captum's)
        tol = 1e-3 if r["kind"] == "train" else 1e-4
        assert r["check"] < tol, (r["case"], r["check"])
