"""[P16] §4: epochs (and seconds) to a test error threshold, EG against backprop on the same schedule."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import load_config, resolve_device
from ..train import train
from .rows import (
    ALL_LABELS,
    CONFIG_DIR,
    CPU_STEPS,
    SUPERVISED_ROWS,
    _steps_per_epoch,
    config_hash,
    epochs_run,
    schedule_label,
    schedule_overrides,
)
from .runner import device_description, git_commit, load_average, read_csv, record_run, resume_point

# ---------------------------------------------------------------- supervised convergence: EG vs backprop


def first_crossing(
    metrics: Sequence[Dict[str, str]], threshold: float, steps_per_epoch: int
) -> Optional[Dict[str, float]]:
    """The first evaluation at or under ``threshold`` % test error: its step, epochs (fractional) and seconds."""
    for m in metrics:
        if float(m["test_error"]) <= threshold:
            step = int(m["step"])
            return {"step": step, "epochs": step / steps_per_epoch, "elapsed_s": float(m["elapsed_s"])}
    return None


def run_convergence(
    model: str,
    schedule: str,
    out_dir: Path,
    seed: int = 0,
    epochs: Optional[int] = None,
    threshold: float = 1.5,
    data_dir: Optional[str] = None,
    extra: Sequence[str] = (),
    progress: bool = False,
) -> Dict[str, Any]:
    """[P16] §4: epochs (and seconds) to reach ``threshold`` % test error, EG vs a backprop convnet.

    Same architecture, same seed (so the same init and the same data order), same schedule; only the trainer
    differs. Evaluated several times per epoch so that the crossing is located to a fraction of an epoch. Each
    trainer's final weights also give a supervised row of Table 1 (rfm-sup / rfm-convnet, drmm5-sup /
    drmm5-convnet), appended to table1.csv (the final test error; nothing is selected on the test curve).
    """
    result: Dict[str, Any] = {"model": model, "threshold": threshold, "seed": seed, "trainers": {}}
    for trainer, suffix in (("eg", ""), ("backprop", "-backprop")):
        path = CONFIG_DIR / f"mnist-sup-{model}{suffix}{'-cpu' if schedule == 'cpu' else ''}.yaml"
        if not path.is_file():
            raise ValueError(
                f"no {schedule} schedule of the supervised comparison for model {model!r} "
                f"(configs/{path.name} is missing)"
            )
        base = [f"seed={seed}", f"labeled_seed={seed}", "tensorboard=false", f"progress={progress}"]
        cfg = load_config(str(path), base)
        changes = {} if schedule == "cpu" else schedule_overrides(cfg, schedule, epochs)
        if schedule == "smoke":
            changes["eval_every_steps"] = CPU_STEPS // 6
        cfg = load_config(str(path), base + [f"{k}={v}" for k, v in changes.items()] + list(extra))
        if schedule == "full":  # four evaluations per epoch on the full test set
            cfg.eval_every_steps = max(1, _steps_per_epoch(cfg, 60_000, 0) // 4)
        if data_dir is not None:
            cfg.data_dir = data_dir
        label = schedule_label(schedule, cfg, epochs, extra, path.name)
        run_dir = (
            out_dir / "runs" / f"convergence-{model}-{trainer}-s{seed}-{label.split('+')[0]}-{config_hash(cfg)[:6]}"
        )
        resume, before = resume_point(run_dir)  # a killed comparison continues where it stopped
        print(
            f"[experiment] convergence {model} {trainer} schedule={label} -> {run_dir}"
            + (f" (resuming at {before:.0f} s)" if resume else ""),
            flush=True,
        )
        commit = git_commit()
        t0 = time.time()
        summary = train(cfg, run_dir, resume=resume)
        wall = round(before + time.time() - t0, 1)  # rounded once: the CSV and the table agree
        row = SUPERVISED_ROWS.get((model, trainer))
        if row is not None:
            record_run(
                out_dir,
                row,
                ALL_LABELS,
                seed,
                label,
                cfg,
                summary,
                summary["test_error"],
                summary["eval_images"],
                "last",
                wall,
                commit,
                run_dir,
            )
        num_train = min(cfg.max_train_samples or 60_000, 60_000) - cfg.val_samples
        crossing = first_crossing(read_csv(run_dir / "metrics.csv"), threshold, _steps_per_epoch(cfg, num_train, 0))
        result["trainers"][trainer] = {
            "reached": crossing,
            "epochs_run": epochs_run(cfg, summary["steps"]),
            "steps": summary["steps"],
            "final_error": summary["test_error"],
            "best_error": summary["best_error"],
            "eval_images": summary["eval_images"],
            "wall_s": wall,
            "schedule": label,
            "run_dir": os.path.relpath(run_dir, out_dir),
        }
        result.update(
            device=device_description(resolve_device(cfg.device)), git_commit=commit, load_average=load_average()
        )
    path = out_dir / f"convergence-{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def convergence_lines(result: Dict[str, Any]) -> List[str]:
    lines = [
        f"## Supervised convergence: EG vs backprop ({result['model']}, threshold {result['threshold']} %)",
        "",
        "Paper ([P16] §4, Fig. 2): the RFM trained by EG reaches 1.5 % test error in 18 epochs, the same-config "
        "convnet trained by backprop in 40.",
        "",
        "| trainer | reaches the threshold at | wall time to it | epochs run | wall time of the run | "
        "final error % | eval images | schedule |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for trainer, t in result["trainers"].items():
        r = t["reached"]
        when = (
            f"epoch {r['epochs']:.2f} (step {r['step']})" if r else f"not reached within {t['epochs_run']:.2f} epochs"
        )
        seconds = f"{r['elapsed_s']:.0f} s" if r else "–"
        lines.append(
            f"| {trainer} | {when} | {seconds} | {t['epochs_run']:.2f} | {t.get('wall_s', 0):.0f} s | "
            f"{t['final_error']:.2f} | {t['eval_images']} | `{t.get('schedule', '')}` |"
        )
    lines += [
        "",
        f"Device {result['device']}, commit {result['git_commit']}, load average at the end {result['load_average']}.",
    ]
    return lines
