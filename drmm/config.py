"""The training configuration: the schema (every key, its default and what it means), its validation, and
loading it from YAML plus ``key=value`` overrides. The trainer (train.py) reads nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import yaml

from .losses import ObjectiveConfig

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
    include_labeled_in_unlabeled: bool = False  # False = DRMM code (docs/model.md#evaluation-protocol); True = USB
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
    # NRM options (docs/model.md#nrm-flavour; all off = the DRMM code's behaviour). See DRMM's docstring.
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



# ---------------------------------------------------------------- loading


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
    """A TrainConfig from a mapping (a run's config.yaml); unknown keys and ill-typed values are refused."""
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


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` key names; ``auto`` = CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


__all__ = ["MODES", "TRAINERS", "TOP_MODELS", "TrainConfig", "config_from_dict", "load_config", "resolve_device"]
