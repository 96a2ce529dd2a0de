"""The run folder: everything a training run reads from and writes to disk.

    config.yaml           the run's TrainConfig (written at the start; ``drmm eval/render/sample`` read it)
    labeled_indices.npy   the labeled subset (plan.make_plan)
    last.pt, best.pt      checkpoints: model, optimizer, scheduler, RNG states, counters (written atomically)
                          tensors and plain values only: load_checkpoint reads them with weights_only=True
    metrics.csv           one row per evaluation (truncated to the checkpoint's step on resume)
    learning_curve.png    test error and loss parts against the step, redrawn at every evaluation
    tensorboard/          the same scalars, when TensorBoard is installed and the config asks for it
    summary.yaml          final and best errors, steps, time (written at the end)

With data parallelism rank 0 alone writes; the other ranks get a ``NullLog``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import yaml

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

from .config import TrainConfig
from .errors import UsageError
from .figures import plot_learning_curve

CONFIG, METRICS, SUMMARY, LEARNING_CURVE = "config.yaml", "metrics.csv", "summary.yaml", "learning_curve.png"
LAST, BEST = "last.pt", "best.pt"
# Keys a resumed run must share with its checkpoint: they decide which images are trained on and the model.
RESUME_KEYS = ("dataset", "max_train_samples", "val_samples", "num_labeled", "labeled_seed", "model")


class RunDirError(UsageError, FileNotFoundError):
    """A folder that is not a run directory, or a run without the checkpoint asked for."""


class RunExistsError(UsageError, FileExistsError):
    """A new run was asked for in a folder that already holds one."""


class CheckpointError(UsageError):
    """A checkpoint file that is truncated, corrupt, not a drmm checkpoint, or of another model."""


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs a folder without a run in it; ``resume`` needs one with a last.pt."""
    ckpt_path = run_dir / LAST
    if resume and not ckpt_path.exists():
        raise RunDirError(
            f"--resume: no checkpoint {ckpt_path} to resume from; drop --resume to start a new run "
            f"there, or point --run-dir at the run to continue"
        )
    if not resume and ckpt_path.exists():
        raise RunExistsError(
            f"{run_dir} already holds a run (last.pt); pass --resume to continue it or choose another --run-dir"
        )


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CONFIG, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    with open(run_dir / SUMMARY, "w") as f:
        yaml.safe_dump(summary, f, sort_keys=False)


# ---------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then os.replace: a kill never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """The torch, numpy, python (and CUDA) RNG states as tensors and plain values, so that checkpoints load with
    ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    version, mt, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "pos": int(np_state["state"]["pos"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved; also takes the numpy/python tuples that older checkpoints hold."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = {
            "bit_generator": np_state["bit_generator"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        }
    np.random.set_state(np_state)
    py_state = state["python"]
    if isinstance(py_state, dict):
        py_state = (py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss_next"])
    random.setstate(py_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run_dir: Path, state: Dict[str, Any], best: bool) -> None:
    """last.pt always; best.pt too when ``best``."""
    atomic_save(state, run_dir / LAST)
    if best:
        atomic_save(state, run_dir / BEST)


# Checkpoints written before rng_state stored tensors hold numpy's legacy RNG tuple, whose key is a uint32
# ndarray: these four globals rebuild that array (and no other dtype) and are all the loader allows beyond
# weights_only's tensors and plain values.
_OLD_NUMPY_RNG_GLOBALS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# What torch's weights-only unpickler names when it meets an object it will not build.
_FORBIDDEN = re.compile(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>")


def _allow_old_numpy_rng():
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(_OLD_NUMPY_RNG_GLOBALS)
    torch.serialization.add_safe_globals(_OLD_NUMPY_RNG_GLOBALS)  # torch 2.4 has no context manager
    return contextlib.nullcontext()


def load_checkpoint(path: Path, device: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint written by ``drmm train``, loaded with ``weights_only=True`` so that unpickling cannot run code.

    Every checkpoint load goes through here. A missing, torn or foreign file, or one holding pickled objects other
    than tensors and plain values, is a ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise RunDirError(
            f"{path} not found: the run has no such checkpoint (training writes last.pt at its first "
            f"evaluation, best.pt at its best one); check the run directory or pass --checkpoint"
        )
    try:
        with _allow_old_numpy_rng():
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a torn zip (OSError/RuntimeError), a forbidden object, a file from a newer torch ...
        forbidden = _FORBIDDEN.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if forbidden:
            raise CheckpointError(
                f"{path}: refused: it holds a pickled Python object "
                f"({forbidden.group(1) or forbidden.group(2)}) and unpickling it could run "
                f"arbitrary code; drmm loads only checkpoints of tensors and plain values, as "
                f"`drmm train` writes them"
            ) from None
        reason = (str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({e.__class__.__name__}: {reason}); "
            f"the file is truncated or corrupt: use the run's other checkpoint (--checkpoint "
            f"best|last) or train again"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "step" not in ckpt:
        what = f"a {type(ckpt).__name__}" + (
            f" with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else ""
        )
        raise CheckpointError(
            f"{path}: not a drmm checkpoint ({what}; a drmm checkpoint is a dict with 'model' "
            f"and 'step'); point the command at a run directory made by `drmm train`"
        )
    return ckpt


def read_checkpoint(run_dir: Path, cfg: TrainConfig, device: torch.device) -> Dict[str, Any]:
    """last.pt of ``run_dir``, refused when it was trained on other data or another model than ``cfg`` says."""
    ckpt = load_checkpoint(run_dir / LAST, device)
    saved = ckpt.get("config", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise UsageError(
                f"--resume: config key {key!r} is {getattr(cfg, key)!r} but the checkpoint was "
                f"trained with {saved[key]!r}; resume with the run's own config"
            )
    return ckpt


# ---------------------------------------------------------------- metrics


METRIC_FIELDS = [
    "epoch",
    "step",
    "phase",
    "lr",
    "loss",
    "ce",
    "rc",
    "kl",
    "klm",
    "nn",
    "train_acc",
    "val_error",
    "test_error",
    "best_error",
    "elapsed_s",
]


class MetricsLog:
    """metrics.csv (+ TensorBoard when installed), truncated to the checkpoint's step on resume."""

    def __init__(self, run_dir: Path, resume_step: Optional[int], tensorboard: bool):
        self.path = run_dir / METRICS
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.rows = rows
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except Exception as e:  # tensorboard not installed: CSV only
                print(f"[drmm] TensorBoard disabled ({e.__class__.__name__}: {e})", file=sys.stderr)

    def scalars(self, step: int, values: Dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def append(self, row: Dict[str, Any]) -> None:
        row = {k: row.get(k, "") for k in METRIC_FIELDS}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)
        self.scalars(
            int(row["step"]),
            {k: float(row[k]) for k in ("val_error", "test_error", "train_acc", "loss", "lr") if row[k] != ""},
            "eval",
        )
        plot_learning_curve(self.rows, self.path.with_name(LEARNING_CURVE))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """The metrics log of ranks other than 0: they write nothing."""

    rows: List[Dict[str, Any]] = []

    def scalars(self, *args) -> None:
        pass

    def append(self, row) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = [
    "CONFIG",
    "METRICS",
    "SUMMARY",
    "LEARNING_CURVE",
    "LAST",
    "BEST",
    "RESUME_KEYS",
    "METRIC_FIELDS",
    "RunDirError",
    "RunExistsError",
    "CheckpointError",
    "load_checkpoint",
    "check_run_dir",
    "write_config",
    "write_summary",
    "atomic_save",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
    "read_checkpoint",
    "MetricsLog",
    "NullLog",
]
