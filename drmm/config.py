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

from .data import DATASETS
from .errors import UsageError, did_you_mean
from .losses import ObjectiveConfig

MODES = ("supervised", "semisupervised", "unsupervised", "pretrain_finetune")
TRAINERS = ("eg", "backprop", "hard_em")
TOP_MODELS = ("class", "factor")
# The other enumerated keys (None = the preset's choice); the model presets are checked against drmm.model.PRESETS.
CHOICES = {
    "norm": (None, "batch", "none"),
    "activation": (None, "relu", "leaky"),
    "mean_unpool_scale": ("none", "inv_area"),
    "mode": MODES,
    "trainer": TRAINERS,
    "top_model": TOP_MODELS,
    "template_class": ("true_if_labeled", "predicted"),
}
# Keys that must be at least this large.
MINIMUM = {
    "epochs": 1,
    "batch_size": 1,
    "eval_batch_size": 1,
    "num_labeled": 0,
    "max_train_samples": 0,
    "eval_samples": 0,
    "val_samples": 0,
    "max_steps": 0,
    "pretrain_epochs": 0,
    "eval_every_steps": 0,
    "ckpt_every_steps": 0,
    "log_every_steps": 1,
    "em_window": 1,
    "factor_dim": 1,
    "labeled_per_batch": 0,
    "kl_rampup_steps": 0,
    "rc_rampup_steps": 0,
    "nn_rampup_steps": 0,
}


def _one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        names = [a for a in allowed if isinstance(a, str)]
        hint = did_you_mean(value, names) if isinstance(value, str) else ""
        shown = ", ".join("null" if a is None else str(a) for a in allowed)
        raise UsageError(f"{name} must be one of {shown}; got {value!r}{hint}")


@dataclass
class TrainConfig:
    name: str = ""  # run name; defaults to the config file's stem
    # data
    dataset: str = "mnist"  # mnist | fashion_mnist | cifar10 | svhn
    data_dir: Optional[str] = None  # else $DRMM_DATA_DIR, else ./data
    download: bool = True  # download missing files from the standard URLs (md5-checked)
    num_labeled: int = 100  # N_L, class-balanced; 0 = every training label
    labeled_seed: int = 0  # seed of the labeled subset (saved as labeled_indices.npy in the run dir)
    include_labeled_in_unlabeled: bool = False  # False = DRMM code (docs/model.md#evaluation-protocol); True = USB
    max_train_samples: int = 0  # 0 = all; else a prefix of the training set (short CPU runs)
    eval_samples: int = 0  # 0 = the whole test set; else its first eval_samples images
    val_samples: int = 0  # > 0: hold out the last N training images; best.pt is chosen on them
    # (0: best.pt is chosen on the test error and labelled best-on-test)
    augment: bool = False  # random crop (4 px) + flip (CIFAR) / crop only (SVHN)
    # model
    model: str = "conv_small"  # rfm | drmm2 | conv_small | conv_large | allconv13
    norm: Optional[str] = None  # override every layer: batch | none (None = preset: batch)
    activation: Optional[str] = None  # override: relu | leaky (None = preset: relu)
    bn_momentum: float = 0.1  # BN running-stat momentum (PyTorch convention; [TF]: EMA 0.99 = 0.01 here)
    mean_unpool_scale: str = "none"  # none = [TF] unscaled repeat | inv_area = [DGM] 1/s^2
    # NRM options (docs/model.md#nrm-flavour; all off = the DRMM code's behaviour). See DRMM's docstring.
    td_batchnorm: bool = False  # untied BN after the template and after every top-down conv ([DGM])
    bias_adder: bool = False  # extra learned bias after each BN ([DGM] BiasAdder; the RPN's b)
    dropout: float = 0.0  # bottom-up dropout after each max-pool ([DGM] CIFAR/SVHN: 0.5)
    td_dropout: float = 0.0  # top-down dropout before each max-unpool ([DGM]: 0.5)
    maxmin: bool = False  # Max-Min model: a min branch, CE/RC/KL averaged 0.5/0.5 ([DGM] nrm_maxmin)
    allconv13_tail_kernel: int = 3  # allconv13: kernel of the 256/128 layers, 3 ([DGM] code) | 1 (conv-large)
    template_class: str = "true_if_labeled"  # true_if_labeled ([DGM]/[UNV]) | predicted ([TF])
    top_model: str = "class"  # class = DRMM templates mu_c | factor = DRFM mu_c + Lambda_c z (drfm.py)
    factor_dim: int = 8  # DRFM: dimension of the Gaussian top latent z
    factor_noise_var: float = 1.0  # DRFM: noise variance s2 of the top factor analyser
    switch_prior_momentum: float = 0.01  # EMA of the switch frequencies kept for sampling ([TF]: decay 0.99)
    # objective (see losses.ObjectiveConfig)
    ce_weight: float = 1.0
    rc_weight: float = 0.5
    kl_weight: float = 0.5
    nn_weight: float = 0.5
    kl_sign: int = -1
    kl_marginal_weight: float = 0.0  # > 0: + this * KL(batch-mean q || U), a class-balance term; 0 = paper/code
    td_nonneg: str = "penalty"
    rc_reduction: str = "mean_all"
    unsup_terms_on: str = "unlabeled"
    nonneg_term: str = "penalty"
    rpn_weight: float = 0.0
    rpn_class_prior: bool = False
    # training
    trainer: str = "eg"  # eg | backprop | hard_em (closed-form M-step, hard_em.py)
    em_ridge: float = 1e-4  # hard_em: relative ridge of every M-step regression
    em_window: int = 10  # hard_em: batches of statistics per M-step
    em_row_fraction: float = 1.0  # hard_em: fraction of input positions each layer regresses on
    mode: str = "semisupervised"
    pretrain_epochs: int = 0  # pretrain_finetune: unsupervised epochs before fine-tuning
    epochs: int = 10
    batch_size: int = 200  # semisupervised: half labeled + half unlabeled ([TF]: 100 + 100)
    max_steps: int = 0  # 0 = no limit; stops early, the lr schedule still spans all epochs
    labeled_per_batch: int = 0  # semisupervised: labeled images per batch (the rest unlabeled); 0 = half
    # ([TF]); fewer = the labeled set is cycled less often per epoch
    kl_rampup_steps: int = 0  # 0 = paper/[TF]: full weight from step 0; N: the KL weights (kl_weight,
    rc_rampup_steps: int = 0  # kl_marginal_weight) / rc_weight / nn_weight ramp up from exp(-5) over
    nn_rampup_steps: int = 0  # the first N steps as exp(-5 (1 - t)^2), t = step / N (train.rampup)
    lr_init: float = 1e-3  # [TF] main.py
    lr_final: float = 1e-6  # [TF] main.py; exponential decay per step from lr_init to lr_final
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # Adam's second-moment decay; 0.999 = [TF] (TensorFlow's default)
    seed: int = 0
    device: str = "auto"  # auto = cuda if available
    eval_every_steps: int = 0  # 0 = at every epoch end; else every N steps (and at the end)
    ckpt_every_steps: int = 0  # extra checkpoints every N steps (always: each epoch end, each eval)
    eval_batch_size: int = 1000
    log_every_steps: int = 10  # TensorBoard train scalars
    tensorboard: bool = True
    progress: bool = True

    def objective(self) -> ObjectiveConfig:
        names = [f.name for f in dataclasses.fields(ObjectiveConfig)]
        return ObjectiveConfig(**{n: getattr(self, n) for n in names})

    def objective_label(self) -> str:
        """The loss terms this config trains, joined by "+" (``table1.csv``'s ``objective`` column).

        CE = cross-entropy on the labeled images; RC = reconstruction; NN = non-negativity penalty on the rendered
        signals (MM: moment matching in its place); KLprior = KL(p(c|I) || p(c)) per image, minimised (kl_sign
        +1, the paper's §4 regulariser); KLent = the same KL with the sign of the authors' code (kl_sign -1: its
        negation is minimised, i.e. the per-image entropy); KLmarg = KL(batch-mean p(c|I) || p(c)); RPN =
        rendering-path normalisation; L2 = ``weight_decay > 0``: Adam adds weight_decay * theta to every parameter's
        gradient, the gradient of an L2 penalty (weight_decay / 2) * ||theta||^2 on all parameters, in every phase.
        ``trainer: backprop`` trains CE alone (plus L2 when set); ``pretrain_finetune`` reads
        "<unsupervised phase> > <fine-tuning phase>"; ``hard_em`` names its closed-form M-step.
        """
        l2 = ["L2"] if self.weight_decay > 0 else []
        if self.trainer == "backprop":
            return "+".join(["CE"] + l2)
        o = self.objective()
        unsup = [
            name
            for name, on in (
                ("RC", o.rc_weight > 0),
                ("MM" if o.moment_matching else "NN", o.nn_weight > 0 and (o.moment_matching or o.nn_penalty_on)),
                ("KLprior" if o.kl_sign > 0 else "KLent", o.kl_weight > 0),
                ("KLmarg", o.kl_marginal_weight > 0),
                ("RPN", o.rpn_weight > 0),
            )
            if on
        ] + l2
        labeled = (["CE"] if o.ce_weight > 0 else []) + unsup
        label = {"unsupervised": "+".join(unsup), "pretrain_finetune": "+".join(unsup) + ">" + "+".join(labeled)}.get(
            self.mode, "+".join(labeled)
        )
        return label + ("(hard-EM)" if self.trainer == "hard_em" else "")

    def validate(self) -> None:
        """Refuse unknown choices, out-of-range values and combinations that do not go together (UsageError)."""
        from .model import PRESETS  # here: drmm.model is heavier than the config

        for name, allowed in CHOICES.items():
            _one_of(name, getattr(self, name), allowed)
        _one_of("dataset", self.dataset.replace("-", "_").lower(), DATASETS)
        _one_of("model", self.model, sorted(PRESETS))
        for name, least in MINIMUM.items():
            if getattr(self, name) < least:
                raise UsageError(f"{name} must be >= {least}, got {getattr(self, name)!r}")
        for name in ("bn_momentum", "switch_prior_momentum", "em_row_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise UsageError(f"adam_beta2 must be in [0, 1), got {self.adam_beta2!r}")
        if self.factor_noise_var <= 0:
            raise UsageError(f"factor_noise_var must be > 0, got {self.factor_noise_var!r}")
        if self.bias_adder and self.norm == "none":
            raise UsageError("bias_adder needs BatchNorm layers; drop norm: none or set bias_adder: false")
        if self.mode == "semisupervised" and self.batch_size < 2:
            raise UsageError(f"batch_size must be >= 2 in semisupervised mode, got {self.batch_size}")
        if self.mode == "semisupervised" and not self.labeled_per_batch < self.batch_size:
            raise UsageError(
                f"labeled_per_batch must be < batch_size ({self.batch_size}) so that a batch keeps "
                f"unlabeled images, got {self.labeled_per_batch}; 0 = half the batch"
            )
        if self.mode == "pretrain_finetune" and not 0 < self.pretrain_epochs < self.epochs:
            raise UsageError(
                f"pretrain_finetune needs 0 < pretrain_epochs < epochs, got pretrain_epochs="
                f"{self.pretrain_epochs}, epochs={self.epochs}"
            )
        if self.allconv13_tail_kernel not in (1, 3):
            raise UsageError(f"allconv13_tail_kernel must be 1 or 3, got {self.allconv13_tail_kernel!r}")
        if self.allconv13_tail_kernel != 3 and self.model != "allconv13":
            raise UsageError(f"allconv13_tail_kernel applies to model allconv13 only, got model {self.model!r}")
        for name in ("dropout", "td_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UsageError(f"{name} must be a probability in [0, 1), got {getattr(self, name)!r}")
        if self.trainer == "backprop":
            for name in ("td_batchnorm", "td_dropout"):
                if getattr(self, name):
                    raise UsageError(f"{name} acts on the top-down pass, which trainer backprop does not run")
        if self.trainer == "hard_em":
            for name in ("td_batchnorm", "td_dropout", "maxmin", "dropout"):
                if getattr(self, name):
                    raise UsageError(
                        f"{name} is not supported by trainer hard_em (its closed-form M-step assumes "
                        f"the plain linear rendering of one branch); use trainer eg"
                    )
        if self.maxmin and self.top_model != "class":
            raise UsageError("maxmin needs top_model 'class' (the factor top reads out one branch only)")
        if self.mode == "unsupervised" and self.trainer == "backprop":
            raise UsageError("trainer=backprop trains on CE only and needs labels; mode=unsupervised has none")
        if self.val_samples < 0:
            raise UsageError(f"val_samples must be >= 0, got {self.val_samples}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 < self.lr_final <= self.lr_init:
            raise UsageError(f"need 0 < lr_final <= lr_init, got lr_init={self.lr_init}, lr_final={self.lr_final}")
        try:
            self.objective()  # validates the loss options
        except ValueError as e:
            raise UsageError(str(e)) from None


# ---------------------------------------------------------------- loading


def _coerce(name: str, value: Any, default: Any, origin: str) -> Any:
    if default is None:  # the Optional keys: None or a string
        return value if value is None else str(value)
    if value is None:
        raise UsageError(f"{origin}: config key {name!r} needs a value (default {default!r}), got null")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{origin}: config key {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise UsageError(f"{origin}: config key {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"{origin}: config key {name!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(value, (dict, list)):
        raise UsageError(f"{origin}: config key {name!r} takes a single value, got {value!r}")
    return str(value)


def _unknown_key(key: Any, origin: str) -> UsageError:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    return UsageError(
        f"{origin}: unknown config key {key!r}{did_you_mean(str(key), known)}; "
        f"the keys and what they mean are listed in drmm/config.py (TrainConfig)"
    )


def config_from_dict(d: Dict[str, Any], origin: Any = "config") -> TrainConfig:
    """A TrainConfig from a mapping (a run's config.yaml); unknown keys and ill-typed values are refused.

    ``origin``: where the values come from, named in the error messages; a string, or a mapping key -> string.
    """
    where = (lambda k: origin.get(k, "config")) if isinstance(origin, dict) else (lambda k: origin)
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in d:
        if key not in known:
            raise _unknown_key(key, where(key))
    cfg = TrainConfig(**{k: _coerce(k, v, getattr(defaults, k), where(k)) for k, v in d.items()})
    return cfg


def read_yaml_mapping(path: Any) -> Dict[str, Any]:
    """A YAML file that must hold a mapping (a config); unreadable or malformed files are a UsageError."""
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{at} ({problem}); fix the file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file; a config is a YAML file of key: value lines") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UsageError(f"{path}: a config must be a YAML mapping of keys to values (key: value lines)")
    return d


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file plus ``key=value`` overrides (values parsed as YAML scalars)."""
    d: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    if path is not None:
        d = read_yaml_mapping(path)
        origin = {k: str(path) for k in d}
        d.setdefault("name", Path(path).stem)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            d[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            d[key] = value  # not a YAML scalar: keep the text; the key's type check decides
        origin[key] = f"--set {item}"
    cfg = config_from_dict(d, origin)
    cfg.validate()
    return cfg


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` key names; ``auto`` = CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu (or config device: auto)"
        )
    return dev


__all__ = [
    "MODES",
    "TRAINERS",
    "TOP_MODELS",
    "CHOICES",
    "TrainConfig",
    "config_from_dict",
    "read_yaml_mapping",
    "load_config",
    "resolve_device",
]
