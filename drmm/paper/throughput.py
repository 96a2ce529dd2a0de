"""Images per second of one EG and one backprop training step (``drmm experiment throughput``)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import drmm_kernels as dk

from ..config import config_from_dict, resolve_device
from ..plan import load_data
from ..train import model_from_config, train_step
from .runner import device_description, git_commit, load_average

# ---------------------------------------------------------------- throughput of one training step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model_name: str, trainer: str, batch: int, device: torch.device, data_dir: Optional[str]):
    """(one training step as a function, images it consumes, data source), fresh model and optimizer (seed 0)."""
    cfg = config_from_dict(
        {"model": model_name, "trainer": trainer, "batch_size": batch, "data_dir": data_dir, "download": False}
    )
    try:
        data = load_data(dataclasses.replace(cfg, max_train_samples=batch), device)
        x, y = data.normalize(data.train_images[:batch]), data.train_labels[:batch]
        image_shape, source = data.image_shape, "mnist"
    except FileNotFoundError:
        image_shape, source = (1, 28, 28), "noise"
        x, y = torch.rand(batch, *image_shape, device=device), torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    model = model_from_config(cfg, image_shape, 10).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    labeled = torch.arange(batch, device=device) < batch // 2
    if trainer == "backprop":  # the trainer drops the unlabeled half before the forward pass
        x, y, labeled = x[labeled], y[labeled], labeled[labeled]
    objective = cfg.objective()

    def step() -> None:
        loss, _, _ = train_step(model, cfg, objective, x, y, labeled)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, len(x), source


def measure_step(
    model_name: str,
    trainer: str,
    batch: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    data_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Images/s of one training step (forward, [render,] backward, Adam), median over ``repeats`` timed steps.

    The batch is half labeled, half unlabeled, as in semi-supervised training (backprop uses the labeled half only,
    as the trainer does). MNIST images when available, else uniform noise (the speed does not depend on them).
    """
    step, images, source = _step_fn(model_name, trainer, batch, device, data_dir)
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds)
    return {
        "model": model_name,
        "trainer": trainer,
        "batch": batch,
        "images_per_step": images,
        "median_step_s": median,
        "images_per_s": batch / median,
        "min_step_s": min(seconds),
        "max_step_s": max(seconds),
        "warmup": warmup,
        "repeats": repeats,
        "data": source,
    }


def measure_backend_ratio(
    model_name: str,
    batch: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    data_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """The EG step on the default (fastest available) kernel backend against the same step on the reference
    backend (plain PyTorch ops, the oracle): two identical models, steps alternated so that both see the same
    machine load; ``ratio`` = median of the per-pair reference / fused step times (above 1: the kernels are
    faster)."""
    steps = {}
    for name in ("reference", "auto"):
        with dk.backend(name):
            steps[name] = _step_fn(model_name, "eg", batch, device, data_dir)[0]
    with dk.backend("auto"):
        backend = dk.resolve_backend(device)

    def timed(name: str) -> float:
        with dk.backend(name):
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            return time.perf_counter() - t0

    for _ in range(warmup):
        timed("reference"), timed("auto")
    pairs = []
    for i in range(repeats):
        order = ("reference", "auto") if i % 2 == 0 else ("auto", "reference")
        t = {name: timed(name) for name in order}
        pairs.append((t["reference"], t["auto"]))
    return {
        "backend": backend,
        "reference_median_step_s": statistics.median(r for r, _ in pairs),
        "backend_median_step_s": statistics.median(f for _, f in pairs),
        "ratio": statistics.median(r / f for r, f in pairs),
        "pairs": repeats,
    }


def run_throughput(
    model_name: str,
    batch: int,
    out_dir: Path,
    warmup: int = 3,
    repeats: int = 10,
    device_name: str = "auto",
    data_dir: Optional[str] = None,
) -> Dict[str, Any]:
    device = resolve_device(device_name)
    load_before = load_average()
    steps = [
        measure_step(model_name, trainer, batch, device, warmup, repeats, data_dir) for trainer in ("eg", "backprop")
    ]
    measurement = {
        "eg_vs_reference": measure_backend_ratio(model_name, batch, device, warmup, repeats, data_dir),
        "device": device_description(device),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "git_commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "steps": steps,
    }
    path = out_dir / "throughput.json"
    history = json.loads(path.read_text()) if path.exists() else {"measurements": []}
    history["measurements"].append(measurement)  # keep the other devices' figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history, indent=2) + "\n")
    return measurement


def _ratio_cell(r: Optional[Dict[str, Any]]) -> str:
    if not r:
        return "not measured"
    return (
        f"{1000 * r['reference_median_step_s']:.0f} / {1000 * r['backend_median_step_s']:.0f} ms "
        f"({r['backend']}): **{r['ratio']:.2f}x**"
    )


def throughput_lines(history: Dict[str, Any]) -> List[str]:
    lines = [
        "## Training-step throughput",
        "",
        "One training step on a semi-supervised batch (half labeled, half unlabeled), median over the timed "
        "repeats (`drmm experiment throughput`). Images/s counts the whole batch for both trainers, as both "
        "consume one batch per step; the EG step runs all of it bottom-up and top-down, the backprop step "
        "only its labeled half, bottom-up. The ratio column times the same EG step on the reference backend (plain "
        "PyTorch ops) and on the kernels, alternated pair by pair (median of the per-pair ratios).",
        "",
        "| device | model | batch | EG: images/s (median step) | backprop: images/s (median step) | "
        "EG step, reference backend / kernels (ratio) | load average before (1, 5, 15 min) | when |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in history["measurements"]:
        by = {s["trainer"]: s for s in m["steps"]}
        eg, bp = by["eg"], by["backprop"]
        lines.append(
            f"| {m['device']} | {eg['model']} | {eg['batch']} | {eg['images_per_s']:.0f} "
            f"({1000 * eg['median_step_s']:.0f} ms) | {bp['images_per_s']:.0f} "
            f"({1000 * bp['median_step_s']:.0f} ms) | {_ratio_cell(m.get('eg_vs_reference'))} | "
            f"{m['load_average_before']} | {m['measured_at']} |"
        )
    return lines
