"""Training a DRMM by EG (or a same-architecture convnet by backprop), nanoGPT style: one readable loop.

EG step (model-spec §4): E-step = bottom-up pass recording the switches, choice of the class template (true label
if labeled, argmax otherwise; a constant), top-down render through the switches; G-step = one Adam step on the
full objective CE + a_RC*RC + a_KL*KL + a_NN*NN. The ``backprop`` trainer is the baseline: same network, CE only.

Modes: supervised (labeled subset only), semisupervised (each batch = half labeled, half unlabeled; the labeled
set is cycled; an epoch is one pass over the unlabeled pool), unsupervised (all training images, no labels),
pretrain_finetune (unsupervised for ``pretrain_epochs``, then supervised on the labeled subset).

Exact resume: each epoch's data order comes from a generator seeded by (seed, epoch); checkpoints hold model,
optimizer, scheduler, RNG states and the epoch/step counters, and are written atomically (temp file + os.replace).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from . import data as data_lib
from . import distributed as dist_lib
from .losses import (MinBranch, ObjectiveConfig, as_floats, drmm_objective, moment_pairs, rpn_per_example,
                     template_classes)
from .drfm import build_drfm
from .hard_em import HardEM, HardEMConfig
from .model import DRMM, build_model
from .priors import attach_switch_priors, load_model_state

MODES = ("supervised", "semisupervised", "unsupervised", "pretrain_finetune")
TRAINERS = ("eg", "backprop", "hard_em")
TOP_MODELS = ("class", "factor")


@dataclass
class TrainConfig:
    name: str = ""                      # run name; defaults to the config file's stem
    # data
    dataset: str = "mnist"              # mnist | fashion_mnist | cifar10 | svhn
    data_dir: Optional[str] = None      # else $DRMM_DATA_DIR, else ./data
    download: bool = True               # download missing files from the standard URLs (md5-checked)
    num_labeled: int = 100              # N_L, class-balanced; 0 = every training label
    labeled_seed: int = 0               # seed of the labeled subset (saved as labeled_indices.npy in the run dir)
    include_labeled_in_unlabeled: bool = False  # False = DRMM code (spec §11); True = USB
    max_train_samples: int = 0          # 0 = all; else a prefix of the training set (short CPU runs)
    eval_samples: int = 0               # 0 = the whole test set; else its first eval_samples images
    val_samples: int = 0                # > 0: hold out the last N training images; best.pt is chosen on them
                                        # (0: best.pt is chosen on the test error and labelled best-on-test)
    augment: bool = False               # random crop (4 px) + flip (CIFAR) / crop only (SVHN)
    # model
    model: str = "conv_small"           # rfm | drmm2 | conv_small | conv_large | allconv13
    norm: Optional[str] = None          # override every layer: batch | none (None = preset: batch)
    activation: Optional[str] = None    # override: relu | leaky (None = preset: relu)
    bn_momentum: float = 0.1            # BN running-stat momentum (PyTorch convention; [TF]: EMA 0.99 = 0.01 here)
    mean_unpool_scale: str = "none"     # none = [TF] unscaled repeat | inv_area = [DGM] 1/s^2
    # NRM options (model-spec §3.3, §4.1, §10; all off = the DRMM code's behaviour). See DRMM's docstring.
    td_batchnorm: bool = False          # untied BN after the template and after every top-down conv ([DGM])
    bias_adder: bool = False            # extra learned bias after each BN ([DGM] BiasAdder; the RPN's b)
    dropout: float = 0.0                # bottom-up dropout after each max-pool ([DGM] CIFAR/SVHN: 0.5)
    td_dropout: float = 0.0             # top-down dropout before each max-unpool ([DGM]: 0.5)
    maxmin: bool = False                # Max-Min model: a min branch, CE/RC/KL averaged 0.5/0.5 ([DGM] nrm_maxmin)
    allconv13_tail_kernel: int = 3      # allconv13: kernel of the 256/128 layers, 3 ([DGM] code) | 1 (conv-large)
    template_class: str = "true_if_labeled"  # true_if_labeled ([DGM]/[UNV]) | predicted ([TF])
    top_model: str = "class"            # class = DRMM templates mu_c | factor = DRFM mu_c + Lambda_c z (drfm.py)
    factor_dim: int = 8                 # DRFM: dimension of the Gaussian top latent z
    factor_noise_var: float = 1.0       # DRFM: noise variance s2 of the top factor analyser
    switch_prior_momentum: float = 0.01  # EMA of the switch frequencies kept for sampling ([TF]: decay 0.99)
    # objective (see losses.ObjectiveConfig)
    ce_weight: float = 1.0
    rc_weight: float = 0.5
    kl_weight: float = 0.5
    nn_weight: float = 0.5
    kl_sign: int = -1
    td_nonneg: str = "penalty"
    rc_reduction: str = "mean_all"
    unsup_terms_on: str = "unlabeled"
    nonneg_term: str = "penalty"
    rpn_weight: float = 0.0
    rpn_class_prior: bool = False
    # training
    trainer: str = "eg"                 # eg | backprop | hard_em (closed-form M-step, hard_em.py)
    em_ridge: float = 1e-4              # hard_em: relative ridge of every M-step regression
    em_window: int = 10                 # hard_em: batches of statistics per M-step
    em_row_fraction: float = 1.0        # hard_em: fraction of input positions each layer regresses on
    mode: str = "semisupervised"
    pretrain_epochs: int = 0            # pretrain_finetune: unsupervised epochs before fine-tuning
    epochs: int = 10
    batch_size: int = 200               # semisupervised: half labeled + half unlabeled ([TF]: 100 + 100)
    max_steps: int = 0                  # 0 = no limit; stops early, the lr schedule still spans all epochs
    lr_init: float = 1e-3               # [TF] main.py
    lr_final: float = 1e-6              # [TF] main.py; exponential decay per step from lr_init to lr_final
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"                # auto = cuda if available
    eval_every_steps: int = 0           # 0 = at every epoch end; else every N steps (and at the end)
    ckpt_every_steps: int = 0           # extra checkpoints every N steps (always: each epoch end, each eval)
    eval_batch_size: int = 1000
    log_every_steps: int = 10           # TensorBoard train scalars
    tensorboard: bool = True
    progress: bool = True

    def objective(self) -> ObjectiveConfig:
        names = [f.name for f in dataclasses.fields(ObjectiveConfig)]
        return ObjectiveConfig(**{n: getattr(self, n) for n in names})

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {TRAINERS}, got {self.trainer!r}")
        if self.top_model not in TOP_MODELS:
            raise ValueError(f"top_model must be one of {TOP_MODELS}, got {self.top_model!r}")
        if self.template_class not in ("true_if_labeled", "predicted"):
            raise ValueError(f"template_class must be 'true_if_labeled' or 'predicted', got {self.template_class!r}")
        if self.mode == "semisupervised" and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 in semisupervised mode, got {self.batch_size}")
        if self.mode == "pretrain_finetune" and not 0 < self.pretrain_epochs < self.epochs:
            raise ValueError(f"pretrain_finetune needs 0 < pretrain_epochs < epochs, got pretrain_epochs="
                             f"{self.pretrain_epochs}, epochs={self.epochs}")
        if self.allconv13_tail_kernel not in (1, 3):
            raise ValueError(f"allconv13_tail_kernel must be 1 or 3, got {self.allconv13_tail_kernel!r}")
        if self.allconv13_tail_kernel != 3 and self.model != "allconv13":
            raise ValueError(f"allconv13_tail_kernel applies to model allconv13 only, got model {self.model!r}")
        for name in ("dropout", "td_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {getattr(self, name)!r}")
        if self.trainer == "backprop":
            for name in ("td_batchnorm", "td_dropout"):
                if getattr(self, name):
                    raise ValueError(f"{name} acts on the top-down pass, which trainer backprop does not run")
        if self.trainer == "hard_em":
            for name in ("td_batchnorm", "td_dropout", "maxmin", "dropout"):
                if getattr(self, name):
                    raise ValueError(f"{name} is not supported by trainer hard_em (its closed-form M-step assumes "
                                     f"the plain linear rendering of one branch); use trainer eg")
        if self.maxmin and self.top_model != "class":
            raise ValueError("maxmin needs top_model 'class' (the factor top reads out one branch only)")
        if self.mode == "unsupervised" and self.trainer == "backprop":
            raise ValueError("trainer=backprop trains on CE only and needs labels; mode=unsupervised has none")
        if self.val_samples < 0:
            raise ValueError(f"val_samples must be >= 0, got {self.val_samples}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 < self.lr_final <= self.lr_init:
            raise ValueError(f"need 0 < lr_final <= lr_init, got lr_init={self.lr_init}, lr_final={self.lr_final}")
        self.objective()  # validates the loss options


# ---------------------------------------------------------------- config loading


def _coerce(name: str, value: Any, default: Any) -> Any:
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {name!r} must be true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"config key {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {name!r} must be a number, got {value!r}")
        return float(value)
    return str(value)


def config_from_dict(d: Dict[str, Any]) -> TrainConfig:
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    cfg = TrainConfig(**{k: _coerce(k, v, getattr(defaults, k)) for k, v in d.items()})
    return cfg


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file plus ``key=value`` overrides (values parsed as YAML scalars)."""
    d: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping of keys to values")
        d.setdefault("name", Path(path).stem)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        d[key.strip()] = yaml.safe_load(value)
    cfg = config_from_dict(d)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------- data plan: which indices each step sees


@dataclass
class DataPlan:
    """Index pools (device tensors) the epochs draw from."""

    labeled: torch.Tensor     # indices into the training set
    unlabeled: torch.Tensor
    all_train: torch.Tensor


def phase(cfg: TrainConfig, epoch: int) -> str:
    """The training mode of ``epoch``: pretrain_finetune is unsupervised first, supervised after."""
    if cfg.mode == "pretrain_finetune":
        return "unsupervised" if epoch < cfg.pretrain_epochs else "supervised"
    return cfg.mode


def steps_in_epoch(cfg: TrainConfig, plan: DataPlan, epoch: int) -> int:
    mode = phase(cfg, epoch)
    if mode == "semisupervised":
        return max(1, len(plan.unlabeled) // (cfg.batch_size // 2))
    pool = plan.all_train if mode == "unsupervised" else plan.labeled
    return max(1, len(pool) // min(cfg.batch_size, len(pool)))


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    # A generator per (seed, epoch): the data order of an epoch does not depend on how we got there (resume).
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + salt)


def epoch_batches(cfg: TrainConfig, plan: DataPlan, epoch: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(labeled indices, unlabeled indices) per step of ``epoch``; either may be empty."""
    mode, steps = phase(cfg, epoch), steps_in_epoch(cfg, plan, epoch)
    g = epoch_generator(cfg.seed, epoch)
    dev = plan.labeled.device
    empty = plan.labeled.new_empty(0)
    if mode == "unsupervised":
        b = min(cfg.batch_size, len(plan.all_train))
        order = plan.all_train[torch.randperm(len(plan.all_train), generator=g).to(dev)]
        return [(empty, order[i * b:(i + 1) * b]) for i in range(steps)]
    if mode == "supervised":
        b = min(cfg.batch_size, len(plan.labeled))
        order = plan.labeled[torch.randperm(len(plan.labeled), generator=g).to(dev)]
        return [(order[i * b:(i + 1) * b], empty) for i in range(steps)]
    half = cfg.batch_size // 2
    unl = plan.unlabeled[torch.randperm(len(plan.unlabeled), generator=g).to(dev)]
    # The labeled set is cycled: as many fresh permutations of it as the epoch needs, back to back.
    cycles = math.ceil(steps * half / len(plan.labeled))
    lab = torch.cat([torch.randperm(len(plan.labeled), generator=g) for _ in range(cycles)]).to(dev)
    lab = plan.labeled[lab]
    return [(lab[i * half:(i + 1) * half], unl[i * half:(i + 1) * half]) for i in range(steps)]


# ---------------------------------------------------------------- one training step, evaluation


def train_step(model: DRMM, cfg: TrainConfig, objective: ObjectiveConfig, x: torch.Tensor, y: torch.Tensor,
               labeled: torch.Tensor, forward=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """Loss of one batch (E-step inside); returns (loss, detached loss parts, logits).

    ``forward`` is what runs the bottom-up pass (a DistributedDataParallel wrapper of ``model``); default ``model``.
    """
    mm = objective.moment_matching and cfg.trainer != "backprop"
    if mm or getattr(model, "record_layer_inputs", False):
        model.record_layer_inputs = mm                   # MM recomputes the pre-BN convs from the layer inputs
    logits, latents = (forward or model)(x)              # bottom-up: switches are recorded, not differentiated
    # Max-Min: the objective sees each branch's logits; ``logits`` (their average) is the prediction.
    branch_logits = latents.branch_logits or (logits,)
    if cfg.trainer == "backprop":                        # the baseline: CE only, no top-down pass
        loss = sum(torch.nn.functional.cross_entropy(z[labeled], y[labeled]) for z in branch_logits) \
            / len(branch_logits)
        return loss, {"loss": loss.detach(), "ce": loss.detach()}, logits
    classes = template_classes(logits, y, labeled, cfg.template_class)   # E-step: a constant class choice

    def rendered_terms(branch_latents):
        """Top-down through one branch's switches: x_hat, levels, NN signals, MM pairs (one conv per layer)."""
        x_hat_, levels_ = model.render(branch_latents, classes, return_levels=True)
        moments_ = moment_pairs(levels_[:-1], model.forward_conv_outputs(branch_latents)) if mm else None
        return x_hat_, levels_, model.unpooled_signals(levels_[:-1]), moments_

    x_hat, levels, signals, moments = rendered_terms(latents)
    rpn = None
    if objective.rpn_weight:                             # second (prior) top-down path, spec §4.1 RPN
        pn_latents = model.prior_path_latents(latents)
        pn_templates = model.prior_template().expand(len(classes), *model.top_shape)
        _, pn_levels = model.render(pn_latents, classes, return_levels=True, templates=pn_templates,
                                    frozen_norms=True)
        rpn = rpn_per_example(model, latents, levels, pn_latents, pn_levels,
                              classes if objective.rpn_class_prior else None)
    min_branch = None
    if latents.min_branch is not None:                   # Max-Min: the min branch renders through its own switches
        m_x_hat, _, m_signals, m_moments = rendered_terms(latents.min_branch)
        min_branch = MinBranch(branch_logits[1], m_x_hat, m_signals, m_moments)
    loss, logs = drmm_objective(objective, branch_logits[0], y, labeled, x, x_hat, signals, moments, rpn,
                                min_branch)
    return loss, logs, logits


@torch.no_grad()
def evaluate(model: DRMM, data: data_lib.ImageData, num: int = 0, batch_size: int = 1000,
             split: str = "test") -> float:
    """Error in percent over the first ``num`` images (0 = all) of the ``test`` or ``val`` split."""
    images, labels = (data.test_images, data.test_labels) if split == "test" else (data.val_images, data.val_labels)
    if images is None:
        raise ValueError(f"the data has no {split!r} split (set val_samples > 0 for a validation split)")
    was_training = model.training
    model.eval()
    n = len(labels) if num <= 0 else min(num, len(labels))
    wrong = torch.zeros((), dtype=torch.long, device=labels.device)
    for i in range(0, n, batch_size):
        logits, _ = model(data.normalize(images[i:min(i + batch_size, n)]))
        wrong += (logits.argmax(1) != labels[i:min(i + batch_size, n)]).sum()
    model.train(was_training)
    return 100.0 * int(wrong) / n


# ---------------------------------------------------------------- run directory: checkpoints, metrics, plots


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same directory, then os.replace: a kill never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


METRIC_FIELDS = ["epoch", "step", "phase", "lr", "loss", "ce", "rc", "kl", "nn", "train_acc", "val_error",
                 "test_error", "best_error", "elapsed_s"]


class MetricsLog:
    """metrics.csv (+ TensorBoard when installed), truncated to the checkpoint's step on resume."""

    def __init__(self, run_dir: Path, resume_step: Optional[int], tensorboard: bool):
        self.path = run_dir / "metrics.csv"
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
        self.scalars(int(row["step"]), {k: float(row[k]) for k in ("val_error", "test_error", "train_acc", "loss", "lr")
                                        if row[k] != ""}, "eval")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_learning_curve(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(steps, [float(r["test_error"]) for r in rows], marker="o")
    ax1.set_xlabel("step"), ax1.set_ylabel("test error (%)"), ax1.set_title("test error")
    ax1.grid(alpha=0.3)
    for key in ("loss", "ce", "rc", "kl", "nn"):
        vals = [float(r[key]) if r[key] not in ("", None) else float("nan") for r in rows]
        ax2.plot(steps, vals, label=key)
    ax2.set_xlabel("step"), ax2.set_title("training loss (mean since last eval)"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- building blocks shared with the CLI


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_from_config(cfg: TrainConfig, image_shape: Sequence[int], num_classes: int) -> DRMM:
    objective = cfg.objective()
    kwargs = dict(norm=cfg.norm, activation=cfg.activation, mean_unpool_scale=cfg.mean_unpool_scale,
                  td_relu=objective.td_relu, bn_momentum=cfg.bn_momentum, td_batchnorm=cfg.td_batchnorm,
                  bias_adder=cfg.bias_adder, dropout=cfg.dropout, td_dropout=cfg.td_dropout, maxmin=cfg.maxmin,
                  tail_kernel=cfg.allconv13_tail_kernel if cfg.model == "allconv13" else None)
    if cfg.top_model == "factor":
        model = build_drfm(cfg.model, image_shape[0], tuple(image_shape[1:]), num_classes,
                           factor_dim=cfg.factor_dim, noise_var=cfg.factor_noise_var, **kwargs)
    else:
        model = build_model(cfg.model, image_shape[0], tuple(image_shape[1:]), num_classes, **kwargs)
    return attach_switch_priors(model, cfg.switch_prior_momentum)


def load_data(cfg: TrainConfig, device: torch.device) -> data_lib.ImageData:
    data = data_lib.load_dataset(cfg.dataset, cfg.data_dir, download_missing=cfg.download)
    if cfg.max_train_samples and cfg.max_train_samples < len(data.train_labels):
        data.train_images = data.train_images[:cfg.max_train_samples]
        data.train_labels = data.train_labels[:cfg.max_train_samples]
    if cfg.val_samples:
        data.hold_out_validation(cfg.val_samples)
    return data.to(device)


def make_plan(cfg: TrainConfig, data: data_lib.ImageData, run_dir: Path) -> DataPlan:
    n = len(data.train_labels)
    dev = data.train_labels.device
    if cfg.num_labeled:
        labeled = data_lib.labeled_subset(data.train_labels.cpu().numpy(), cfg.num_labeled, data.num_classes,
                                          cfg.labeled_seed, run_dir / "labeled_indices.npy")
    else:
        labeled = np.arange(n, dtype=np.int64)
    unlabeled = data_lib.unlabeled_pool(n, labeled, cfg.include_labeled_in_unlabeled or not cfg.num_labeled)
    return DataPlan(torch.from_numpy(labeled).to(dev), torch.from_numpy(unlabeled).to(dev),
                    torch.arange(n, device=dev))


def lr_lambda_for(cfg: TrainConfig, total_steps: int, pretrain_steps: int = 0):
    """Exponential decay lr_init -> lr_final over the run (model-spec §5.1, [TF] main.py), per step.

    With pretrain_finetune the decay restarts at lr_init for the fine-tuning phase (``pretrain_steps`` steps in),
    so fine-tuning does not start at an lr that unsupervised pre-training already decayed away.
    """
    ratio = cfg.lr_final / cfg.lr_init

    def lr_factor(step: int) -> float:
        start, length = (0, pretrain_steps) if step < pretrain_steps else (pretrain_steps, total_steps - pretrain_steps)
        return ratio ** (min(step - start, length) / max(1, length))
    return lr_factor


# ---------------------------------------------------------------- the training loop


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> Dict[str, Any]:
    """Train according to ``cfg`` in ``run_dir``; returns a summary (final/best test error, steps, time)."""
    cfg.validate()
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.pt"
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt_path} to resume from")
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it or choose "
                              f"another --run-dir")
    device, joined_group = dist_lib.setup(cfg.device)  # torchrun: join the process group (after the checks)
    rank, world, _ = dist_lib.rank_and_world()
    data = load_data(cfg, device)  # before touching the run dir: a missing data set leaves no empty run behind
    if rank == 0:                  # data parallel: rank 0 alone writes to the run dir
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if rank == 0:
        plan = make_plan(cfg, data, run_dir)
    if world > 1:
        torch.distributed.barrier()  # the other ranks read the labeled subset rank 0 saved
    if rank != 0:
        plan = make_plan(cfg, data, run_dir)
    model = model_from_config(cfg, data.image_shape, data.num_classes).to(device)
    forward = None  # what runs the bottom-up pass: the model, or its DistributedDataParallel wrapper
    if world > 1:
        dist_lib.convert_sync_fused_bn(model)
        if cfg.td_batchnorm:   # the top-down BNs are plain BatchNorm2d: synchronise them too (CUDA only)
            if device.type != "cuda":
                raise ValueError("td_batchnorm with data parallelism needs CUDA devices (torch's SyncBatchNorm)")
            for name in ("td_norms", "min_td_norms"):
                if getattr(model, name, None) is not None:
                    setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
        if cfg.trainer != "hard_em":
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
    em = HardEM(model, HardEMConfig(cfg.em_ridge, cfg.em_window, cfg.template_class, cfg.em_row_fraction),
                seed=cfg.seed) if cfg.trainer == "hard_em" else None
    objective = cfg.objective()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr_init, weight_decay=cfg.weight_decay)
    total_steps = sum(steps_in_epoch(cfg, plan, e) for e in range(cfg.epochs))
    pretrain_steps = sum(steps_in_epoch(cfg, plan, e) for e in range(cfg.pretrain_epochs)) \
        if cfg.mode == "pretrain_finetune" else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, total_steps, pretrain_steps))

    epoch, step_in_epoch, step, best_error, elapsed = 0, 0, 0, float("inf"), 0.0
    best_on = "validation" if cfg.val_samples else "test"   # what best.pt is selected on
    test_at_best = float("nan")
    if resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = ckpt.get("config", {})
        for key in ("dataset", "max_train_samples", "val_samples", "num_labeled", "labeled_seed", "model"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise ValueError(f"--resume: config key {key!r} is {getattr(cfg, key)!r} but the checkpoint was "
                                 f"trained with {saved[key]!r}; resume with the run's own config")
        load_model_state(model, ckpt["model"])
        if em is not None and ckpt.get("hard_em") is not None:
            em.load_state_dict(ckpt["hard_em"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch, step_in_epoch, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        best_error, elapsed = ckpt["best_error"], ckpt["elapsed_s"]
        test_at_best = ckpt.get("test_at_best", float("nan"))
        set_rng_state(ckpt["rng"])
        print(f"[drmm] resumed {run_dir} at epoch {epoch}, step {step}")
    log = MetricsLog(run_dir, step if resume else None, cfg.tensorboard) if rank == 0 else _NullLog()

    def checkpoint(test_error: Optional[float], score: Optional[float] = None) -> None:
        """last.pt always; best.pt too when ``score`` (the selection error) is the best so far."""
        if rank != 0:
            return
        state = {"hard_em": em.state_dict() if em is not None else None, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                 "step": step, "best_error": best_error, "test_at_best": test_at_best,
                 "elapsed_s": elapsed + time.time() - t_start,
                 "rng": rng_state(), "config": dataclasses.asdict(cfg), "test_error": test_error}
        atomic_save(state, ckpt_path)
        if score is not None and score <= best_error:
            atomic_save(state, run_dir / "best.pt")

    sums: Dict[str, float] = {}
    counts = {"n": 0, "correct": 0, "labeled": 0}
    pending: Dict[str, torch.Tensor] = {}  # loss parts and labeled hits summed on the device since the last fetch
    pending_steps = 0

    def fetch_pending() -> Dict[str, float]:
        """Add the device-side sums to the host-side ones (one host sync); returns their per-step means."""
        nonlocal pending_steps
        if not pending_steps:
            return {}
        values = as_floats(pending)
        counts["correct"] += int(values.pop("correct", 0))
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        means = {k: v / pending_steps for k, v in values.items()}
        pending.clear()
        pending_steps = 0
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"loss became {means['loss']} in the steps up to {step} ({means}); lower "
                                     f"lr_init or the loss weights")
        return means

    def eval_and_log() -> Tuple[float, float]:
        """(test error, selection error): the latter is the validation error when there is a split."""
        nonlocal best_error, test_at_best
        fetch_pending()
        test_error = evaluate(model, data, cfg.eval_samples, cfg.eval_batch_size)
        val_error = evaluate(model, data, 0, cfg.eval_batch_size, "val") if cfg.val_samples else None
        score = test_error if val_error is None else val_error
        if score <= best_error:
            best_error, test_at_best = score, test_error
        n = max(1, counts["n"])
        row = {"epoch": epoch, "step": step, "phase": trained_phase,
               "lr": optimizer.param_groups[0]["lr"],
               **{k: f"{v / n:.6g}" for k, v in sums.items()},
               "train_acc": f"{100.0 * counts['correct'] / max(1, counts['labeled']):.3f}" if counts["labeled"] else "",
               "val_error": "" if val_error is None else f"{val_error:.4f}",
               "test_error": f"{test_error:.4f}", "best_error": f"{best_error:.4f}",
               "elapsed_s": f"{elapsed + time.time() - t_start:.1f}"}
        log.append(row)
        if rank == 0:
            plot_learning_curve(log.rows, run_dir / "learning_curve.png")
        sums.clear()
        counts.update(n=0, correct=0, labeled=0)
        return test_error, score

    t_start = time.time()
    test_error, trained_phase = None, phase(cfg, min(epoch, cfg.epochs - 1))
    stop = cfg.max_steps and step >= cfg.max_steps
    model.train()
    while epoch < cfg.epochs and not stop:
        trained_phase = phase(cfg, epoch)
        batches = epoch_batches(cfg, plan, epoch)
        bar = _progress(cfg, len(batches), step_in_epoch, f"epoch {epoch + 1}/{cfg.epochs} [{phase(cfg, epoch)}]")
        while step_in_epoch < len(batches):
            lab_idx, unl_idx = batches[step_in_epoch]
            if world > 1:
                lab_idx = dist_lib.shard(lab_idx, rank, world, "the labeled part of a batch")
                unl_idx = dist_lib.shard(unl_idx, rank, world, "the unlabeled part of a batch")
            if cfg.trainer == "backprop":  # the baseline sees the labeled half only (not even in its BN statistics)
                unl_idx = unl_idx[:0]
            idx = torch.cat([lab_idx, unl_idx])
            x = data.normalize(data.train_images[idx])
            if cfg.augment:
                x = data_lib.augment(x, epoch_generator(cfg.seed, step, salt=1), flip=cfg.dataset != "svhn")
            y = data.train_labels[idx]
            labeled = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
            labeled[:len(lab_idx)] = True
            if em is not None:  # hard EM: E-step statistics, closed-form M-step every em_window batches
                logs, logits = em.step(x, y, labeled)
            else:
                loss, logs, logits = train_step(model, cfg, objective, x, y, labeled, forward)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            step_in_epoch += 1
            step += 1
            # No per-step host sync: the loss parts and the labeled hits are summed on the device and fetched once
            # per log interval (and before each evaluation), so the host keeps queueing steps while the device runs.
            for k, v in logs.items():
                pending[k] = pending[k] + v.detach().float() if k in pending else v.detach().float()
            if len(lab_idx):
                hits = (logits[:len(lab_idx)].argmax(1) == y[:len(lab_idx)]).sum()
                pending["correct"] = pending["correct"] + hits if "correct" in pending else hits
                counts["labeled"] += len(lab_idx)
            pending_steps += 1
            counts["n"] += 1
            if step % cfg.log_every_steps == 0:
                means = fetch_pending()  # the interval's one host sync; raises if the loss is not finite
                log.scalars(step, {**means, "lr": optimizer.param_groups[0]["lr"]}, "train")
                if bar is not None:
                    acc = 100.0 * counts["correct"] / counts["labeled"] if counts["labeled"] else float("nan")
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{acc:.1f}")
            if bar is not None:
                bar.update(1)
            stop = bool(cfg.max_steps) and step >= cfg.max_steps
            end_of_epoch = step_in_epoch == len(batches)
            if end_of_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            last_step = stop or epoch == cfg.epochs
            if cfg.eval_every_steps:
                do_eval = last_step or step % cfg.eval_every_steps == 0
            else:
                do_eval = last_step or end_of_epoch
            if do_eval:
                test_error, score = eval_and_log()
                if bar is not None:
                    bar.set_postfix(test_err=f"{test_error:.2f}")
                checkpoint(test_error, score)
            elif end_of_epoch or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0):
                checkpoint(None)
            if stop or end_of_epoch:
                break
        if bar is not None:
            bar.close()
    if test_error is None:  # nothing left to train (resumed a finished run): still report
        test_error = evaluate(model, data, cfg.eval_samples, cfg.eval_batch_size)
    log.close()
    summary = {"test_error": test_error, "best_error": best_error, "best_on": best_on,
               "test_error_at_best": test_at_best, "steps": step, "epochs_done": epoch,
               "eval_images": cfg.eval_samples or len(data.test_labels),
               "train_seconds": elapsed + time.time() - t_start}
    if rank == 0:
        with open(run_dir / "summary.yaml", "w") as f:
            yaml.safe_dump(summary, f, sort_keys=False)
    if joined_group:
        torch.distributed.destroy_process_group()
    return summary


class _NullLog:
    """The metrics log of ranks other than 0: they write nothing."""

    rows: List[Dict[str, Any]] = []

    def scalars(self, *args) -> None:
        pass

    def append(self, row) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(cfg: TrainConfig, total: int, initial: int, desc: str):
    if not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
