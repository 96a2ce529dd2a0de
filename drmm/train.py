"""Training a DRMM by EG (or a same-architecture convnet by backprop, or by hard EM), nanoGPT style: read it top
to bottom. The config schema is in config.py, the data plan in plan.py, the run folder's files in run_dir.py.

EG step (docs/model.md#eg-training): E-step = bottom-up pass recording the switches, choice of the class template
(true label if labeled, argmax otherwise; a constant), top-down render through the switches; G-step = one Adam step
on the full objective CE + a_RC*RC + a_KL*KL + a_NN*NN (optional ramp-ups scale the weights by the global
step: ``ramped_objective``). The ``backprop`` trainer is the baseline: same network,
CE only. ``hard_em`` replaces the G-step by a closed-form M-step (hard_em.py, docs/model.md#hard-em).

``train()`` is the loop; everything it changes lives in one ``TrainState``, which the helpers below it take and
update, and of which a checkpoint is a snapshot. Exact resume: each epoch's data order depends on (seed, epoch)
only (plan.epoch_batches), and checkpoints hold model, optimizer, scheduler, RNG states and the epoch/step counters.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import data as data_lib
from . import distributed as dist_lib
from .config import TrainConfig
from .drfm import build_drfm
from .hard_em import HardEM, HardEMConfig
from .losses import (
    MinBranch,
    ObjectiveConfig,
    as_floats,
    drmm_objective,
    moment_pairs,
    rpn_per_example,
    template_classes,
)
from .model import DRMM, Latents, build_model
from .plan import DataPlan, epoch_batches, epoch_generator, load_data, make_plan, phase, steps_in_epoch
from .priors import attach_switch_priors, load_model_state
from .run_dir import (
    MetricsLog,
    NullLog,
    check_run_dir,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_config,
    write_summary,
)


# ---------------------------------------------------------------- the model, one step, evaluation


def model_from_config(cfg: TrainConfig, image_shape: Sequence[int], num_classes: int) -> DRMM:
    """The DRMM (or DRFM, ``top_model: factor``) that ``cfg`` describes, with its switch priors attached."""
    objective = cfg.objective()
    kwargs = dict(
        norm=cfg.norm,
        activation=cfg.activation,
        mean_unpool_scale=cfg.mean_unpool_scale,
        td_relu=objective.td_relu,
        bn_momentum=cfg.bn_momentum,
        td_batchnorm=cfg.td_batchnorm,
        bias_adder=cfg.bias_adder,
        dropout=cfg.dropout,
        td_dropout=cfg.td_dropout,
        maxmin=cfg.maxmin,
        tail_kernel=cfg.allconv13_tail_kernel if cfg.model == "allconv13" else None,
    )
    if cfg.top_model == "factor":
        model = build_drfm(
            cfg.model,
            image_shape[0],
            tuple(image_shape[1:]),
            num_classes,
            factor_dim=cfg.factor_dim,
            noise_var=cfg.factor_noise_var,
            **kwargs,
        )
    else:
        model = build_model(cfg.model, image_shape[0], tuple(image_shape[1:]), num_classes, **kwargs)
    return attach_switch_priors(model, cfg.switch_prior_momentum)


def render_branch(model: DRMM, latents: Latents, classes: torch.Tensor, moment_matching: bool):
    """Top-down through one branch's switches: x_hat, levels, NN signals, MM pairs (one conv per layer)."""
    x_hat, levels = model.render(latents, classes, return_levels=True)
    moments = moment_pairs(levels[:-1], model.forward_conv_outputs(latents)) if moment_matching else None
    return x_hat, levels, model.unpooled_signals(levels[:-1]), moments


def train_step(
    model: DRMM,
    cfg: TrainConfig,
    objective: ObjectiveConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    labeled: torch.Tensor,
    forward=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """Loss of one batch (E-step inside); returns (loss, detached loss parts, logits).

    ``forward`` is what runs the bottom-up pass (a DistributedDataParallel wrapper of ``model``); default ``model``.
    """
    mm = objective.moment_matching and cfg.trainer != "backprop"
    if mm or getattr(model, "record_layer_inputs", False):
        model.record_layer_inputs = mm  # MM recomputes the pre-BN convs from the layer inputs
    logits, latents = (forward or model)(x)  # bottom-up: switches are recorded, not differentiated
    # Max-Min: the objective sees each branch's logits; ``logits`` (their average) is the prediction.
    branch_logits = latents.branch_logits or (logits,)
    if cfg.trainer == "backprop":  # the baseline: CE only, no top-down pass
        loss = sum(torch.nn.functional.cross_entropy(z[labeled], y[labeled]) for z in branch_logits) / len(
            branch_logits
        )
        return loss, {"loss": loss.detach(), "ce": loss.detach()}, logits
    classes = template_classes(logits, y, labeled, cfg.template_class)  # E-step: a constant class choice
    x_hat, levels, signals, moments = render_branch(model, latents, classes, mm)
    rpn = None
    if objective.rpn_weight:  # second (prior) top-down path, docs/model.md#loss-terms (RPN)
        pn_latents = model.prior_path_latents(latents)
        pn_templates = model.prior_template().expand(len(classes), *model.top_shape)
        _, pn_levels = model.render(pn_latents, classes, return_levels=True, templates=pn_templates, frozen_norms=True)
        rpn = rpn_per_example(
            model, latents, levels, pn_latents, pn_levels, classes if objective.rpn_class_prior else None
        )
    min_branch = None
    if latents.min_branch is not None:  # Max-Min: the min branch renders through its own switches
        m_x_hat, _, m_signals, m_moments = render_branch(model, latents.min_branch, classes, mm)
        min_branch = MinBranch(branch_logits[1], m_x_hat, m_signals, m_moments)
    loss, logs = drmm_objective(objective, branch_logits[0], y, labeled, x, x_hat, signals, moments, rpn, min_branch)
    return loss, logs, logits


@torch.no_grad()
def evaluate(model: DRMM, data: data_lib.ImageData, num: int = 0, batch_size: int = 1000, split: str = "test") -> float:
    """Error in percent over the first ``num`` images (0 = all) of the ``test`` or ``val`` split."""
    images, labels = (data.test_images, data.test_labels) if split == "test" else (data.val_images, data.val_labels)
    if images is None:
        raise ValueError(f"the data has no {split!r} split (set val_samples > 0 for a validation split)")
    was_training = model.training
    model.eval()
    n = len(labels) if num <= 0 else min(num, len(labels))
    wrong = torch.zeros((), dtype=torch.long, device=labels.device)
    for i in range(0, n, batch_size):
        logits, _ = model(data.normalize(images[i : min(i + batch_size, n)]))
        wrong += (logits.argmax(1) != labels[i : min(i + batch_size, n)]).sum()
    model.train(was_training)
    return 100.0 * int(wrong) / n


def lr_lambda_for(cfg: TrainConfig, total_steps: int, pretrain_steps: int = 0) -> Callable[[int], float]:
    """Exponential decay lr_init -> lr_final over the run (docs/model.md#architectures-and-protocol, [TF] main.py),
    per step.

    With pretrain_finetune the decay restarts at lr_init for the fine-tuning phase (``pretrain_steps`` steps in),
    so fine-tuning does not start at an lr that unsupervised pre-training already decayed away.
    """
    ratio = cfg.lr_final / cfg.lr_init

    def lr_factor(step: int) -> float:
        start, length = (0, pretrain_steps) if step < pretrain_steps else (pretrain_steps, total_steps - pretrain_steps)
        return ratio ** (min(step - start, length) / max(1, length))

    return lr_factor


def rampup(step: int, length: int) -> float:
    """Weight factor of a term ramped up over ``length`` steps: exp(-5 (1 - t)^2), t = step / length (exp(-5) at
    step 0), 1 from step ``length`` on and when ``length`` is 0 (no ramp-up). Laine & Aila's sigmoid-shaped ramp-up;
    not in the paper or the DRMM code."""
    if length <= 0 or step >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / length) ** 2)


def ramped_objective(cfg: TrainConfig, objective: ObjectiveConfig, step: int) -> ObjectiveConfig:
    """``objective`` with the KL (kl_weight, kl_marginal_weight), RC and NN weights scaled by their ramp-ups at the
    global ``step`` (0-based); the same object when no ramp-up is on."""
    if not (cfg.kl_rampup_steps or cfg.rc_rampup_steps or cfg.nn_rampup_steps):
        return objective
    kl, rc, nn = (
        rampup(step, cfg.kl_rampup_steps),
        rampup(step, cfg.rc_rampup_steps),
        rampup(step, cfg.nn_rampup_steps),
    )
    return dataclasses.replace(
        objective,
        kl_weight=objective.kl_weight * kl,
        rc_weight=objective.rc_weight * rc,
        nn_weight=objective.nn_weight * nn,
        kl_marginal_weight=objective.kl_marginal_weight * kl,
    )


# ---------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a run is made of and everything the loop changes. A checkpoint is a snapshot of it."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    rank: int  # data parallel: this process's rank (0 alone writes the run folder)
    world: int  # number of ranks (1 = a single process)
    joined_group: bool  # whether setup() joined a torchrun process group (and must leave it)
    data: data_lib.ImageData
    plan: DataPlan
    model: DRMM
    forward: Optional[torch.nn.Module]  # what runs the bottom-up pass: None = the model, else its DDP wrapper
    em: Optional[HardEM]  # trainer hard_em: its statistics and M-step
    objective: ObjectiveConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log: Any = None  # run_dir.MetricsLog on rank 0, run_dir.NullLog elsewhere
    # counters (restored on resume)
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    best_error: float = float("inf")  # the selection error of best.pt (validation if val_samples, else test)
    test_at_best: float = float("nan")  # the test error at that checkpoint
    elapsed_before: float = 0.0  # seconds trained before this process started (resume)
    t_start: float = 0.0  # time.time() when this process entered the loop
    test_error: Optional[float] = None  # the latest evaluation's
    trained_phase: str = ""  # the mode of the epoch being trained (metrics.csv's "phase")
    # training statistics since the last evaluation: host-side sums, and device-side ones fetched once per log
    # interval (no per-step host sync, so the host keeps queueing steps while the device runs)
    sums: Dict[str, float] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=lambda: {"n": 0, "correct": 0, "labeled": 0})
    pending: Dict[str, torch.Tensor] = field(default_factory=dict)
    pending_steps: int = 0

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.time() - self.t_start


def setup(cfg: TrainConfig, run_dir: Path, resume: bool = False) -> TrainState:
    """Everything ``train`` needs: process group, data, plan, model, optimizer, and the checkpoint on resume."""
    cfg.validate()
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    device, joined_group = dist_lib.setup(cfg.device)  # torchrun: join the process group (after the checks)
    rank, world, _ = dist_lib.rank_and_world()
    data = load_data(cfg, device)  # before touching the run dir: a missing data set leaves no empty run behind
    if rank == 0:  # data parallel: rank 0 alone writes to the run dir
        write_config(run_dir, cfg)

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
    forward = data_parallel(cfg, model, device) if world > 1 else None
    em = (
        HardEM(model, HardEMConfig(cfg.em_ridge, cfg.em_window, cfg.template_class, cfg.em_row_fraction), seed=cfg.seed)
        if cfg.trainer == "hard_em"
        else None
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr_init, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    total_steps = sum(steps_in_epoch(cfg, plan, e) for e in range(cfg.epochs))
    pretrain_steps = (
        sum(steps_in_epoch(cfg, plan, e) for e in range(cfg.pretrain_epochs)) if cfg.mode == "pretrain_finetune" else 0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, total_steps, pretrain_steps))
    state = TrainState(
        cfg,
        run_dir,
        device,
        rank,
        world,
        joined_group,
        data,
        plan,
        model,
        forward,
        em,
        cfg.objective(),
        optimizer,
        scheduler,
    )
    if resume:
        restore(state, read_checkpoint(run_dir, cfg, device))
        print(f"[drmm] resumed {run_dir} at epoch {state.epoch}, step {state.step}")
    state.log = MetricsLog(run_dir, state.step if resume else None, cfg.tensorboard) if rank == 0 else NullLog()
    return state


def data_parallel(cfg: TrainConfig, model: DRMM, device: torch.device) -> Optional[torch.nn.Module]:
    """Synchronise the model's BNs across ranks; the DDP wrapper that runs its forward (None for hard EM)."""
    dist_lib.convert_sync_fused_bn(model)
    if cfg.td_batchnorm:  # the top-down BNs are plain BatchNorm2d: synchronise them too (CUDA only)
        if device.type != "cuda":
            raise ValueError("td_batchnorm with data parallelism needs CUDA devices (torch's SyncBatchNorm)")
        for name in ("td_norms", "min_td_norms"):
            if getattr(model, name, None) is not None:
                setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
    if cfg.trainer == "hard_em":
        return None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def restore(s: TrainState, ckpt: Dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, scheduler, counters and RNG states."""
    load_model_state(s.model, ckpt["model"])
    if s.em is not None and ckpt.get("hard_em") is not None:
        s.em.load_state_dict(ckpt["hard_em"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.scheduler.load_state_dict(ckpt["scheduler"])
    s.epoch, s.step_in_epoch, s.step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    s.best_error, s.elapsed_before = ckpt["best_error"], ckpt["elapsed_s"]
    s.test_at_best = ckpt.get("test_at_best", float("nan"))
    set_rng_state(ckpt["rng"])


def save_checkpoint(s: TrainState, test_error: Optional[float], score: Optional[float] = None) -> None:
    """last.pt always; best.pt too when ``score`` (the selection error) is the best so far. Rank 0 only."""
    if s.rank != 0:
        return
    ckpt = {
        "hard_em": s.em.state_dict() if s.em is not None else None,
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "epoch": s.epoch,
        "step_in_epoch": s.step_in_epoch,
        "step": s.step,
        "best_error": s.best_error,
        "test_at_best": s.test_at_best,
        "elapsed_s": s.elapsed_s(),
        "rng": rng_state(),
        "config": dataclasses.asdict(s.cfg),
        "test_error": test_error,
    }
    write_checkpoint(s.run_dir, ckpt, best=score is not None and score <= s.best_error)


# ---------------------------------------------------------------- what the loop does each step


def batch(
    s: TrainState, lab_idx: torch.Tensor, unl_idx: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images, labels, labeled mask, number labeled) of this rank's part of one step's batch."""
    cfg, data = s.cfg, s.data
    if s.world > 1:
        lab_idx = dist_lib.shard(lab_idx, s.rank, s.world, "the labeled part of a batch")
        unl_idx = dist_lib.shard(unl_idx, s.rank, s.world, "the unlabeled part of a batch")
    if cfg.trainer == "backprop":  # the baseline sees the labeled half only (not even in its BN statistics)
        unl_idx = unl_idx[:0]
    idx = torch.cat([lab_idx, unl_idx])
    x = data.normalize(data.train_images[idx])
    if cfg.augment:
        x = data_lib.augment(x, epoch_generator(cfg.seed, s.step, salt=1), flip=cfg.dataset != "svhn")
    labeled = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    labeled[: len(lab_idx)] = True
    return x, data.train_labels[idx], labeled, len(lab_idx)


def optimize(
    s: TrainState, x: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """One training step on a batch; returns (loss parts, logits)."""
    if s.em is not None:  # hard EM: E-step statistics, closed-form M-step every em_window batches
        return s.em.step(x, y, labeled)
    objective = ramped_objective(s.cfg, s.objective, s.step)  # s.step: the global step, restored on resume
    loss, logs, logits = train_step(s.model, s.cfg, objective, x, y, labeled, s.forward)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    s.scheduler.step()
    return logs, logits


def accumulate(
    s: TrainState, logs: Dict[str, torch.Tensor], logits: torch.Tensor, y: torch.Tensor, num_labeled: int
) -> None:
    """Add one step's loss parts and labeled hits to the device-side sums (no host sync)."""
    for k, v in logs.items():
        s.pending[k] = s.pending[k] + v.detach().float() if k in s.pending else v.detach().float()
    if num_labeled:
        hits = (logits[:num_labeled].argmax(1) == y[:num_labeled]).sum()
        s.pending["correct"] = s.pending["correct"] + hits if "correct" in s.pending else hits
        s.counts["labeled"] += num_labeled
    s.pending_steps += 1
    s.counts["n"] += 1


def fetch_pending(s: TrainState) -> Dict[str, float]:
    """Add the device-side sums to the host-side ones (one host sync); returns their per-step means."""
    if not s.pending_steps:
        return {}
    values = as_floats(s.pending)
    s.counts["correct"] += int(values.pop("correct", 0))
    for k, v in values.items():
        s.sums[k] = s.sums.get(k, 0.0) + v
    means = {k: v / s.pending_steps for k, v in values.items()}
    s.pending.clear()
    s.pending_steps = 0
    if not math.isfinite(means["loss"]):
        raise FloatingPointError(
            f"loss became {means['loss']} in the steps up to {s.step} ({means}); lower lr_init or the loss weights"
        )
    return means


def evaluate_and_log(s: TrainState) -> Tuple[Optional[float], float]:
    """Evaluate, append a metrics.csv row, reset the statistics. Returns (test error, selection error): with a
    validation split the latter is the validation error and the former None."""
    cfg = s.cfg
    fetch_pending(s)
    val_error = evaluate(s.model, s.data, 0, cfg.eval_batch_size, "val") if cfg.val_samples else None
    # With a validation split, the test set is not looked at while training: finish() scores it once, at the end.
    test_error = evaluate(s.model, s.data, cfg.eval_samples, cfg.eval_batch_size) if val_error is None else None
    score = test_error if val_error is None else val_error
    if score <= s.best_error:
        s.best_error, s.test_at_best = score, float("nan") if test_error is None else test_error
    n = max(1, s.counts["n"])
    labeled = s.counts["labeled"]
    s.log.append(
        {
            "epoch": s.epoch,
            "step": s.step,
            "phase": s.trained_phase,
            "lr": s.optimizer.param_groups[0]["lr"],
            **{k: f"{v / n:.6g}" for k, v in s.sums.items()},
            "train_acc": f"{100.0 * s.counts['correct'] / max(1, labeled):.3f}" if labeled else "",
            "val_error": "" if val_error is None else f"{val_error:.4f}",
            "test_error": "" if test_error is None else f"{test_error:.4f}",
            "best_error": f"{s.best_error:.4f}",
            "elapsed_s": f"{s.elapsed_s():.1f}",
        }
    )
    s.sums.clear()
    s.counts.update(n=0, correct=0, labeled=0)
    return test_error, score


def progress_bar(cfg: TrainConfig, total: int, initial: int, desc: str):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------- the training loop


def train(cfg: TrainConfig, run_dir: Path, resume: bool = False, score_test: bool = True) -> Dict[str, Any]:
    """Train according to ``cfg`` in ``run_dir``; returns a summary (final/best test error, steps, time).

    ``score_test=False`` (only with a validation split): never look at the test set, not even at the end (study
    trials that choose settings); the summary's test_error is then None."""
    if not score_test and not cfg.val_samples:
        raise ValueError("train: score_test=False needs a validation split (val_samples > 0)")
    s = setup(cfg, run_dir, resume)
    s.t_start = time.time()
    s.trained_phase = phase(cfg, min(s.epoch, cfg.epochs - 1))
    stop = cfg.max_steps and s.step >= cfg.max_steps
    s.model.train()
    while s.epoch < cfg.epochs and not stop:
        s.trained_phase = phase(cfg, s.epoch)
        batches = epoch_batches(cfg, s.plan, s.epoch)
        bar = progress_bar(cfg, len(batches), s.step_in_epoch, f"epoch {s.epoch + 1}/{cfg.epochs} [{s.trained_phase}]")
        while s.step_in_epoch < len(batches):
            x, y, labeled, num_labeled = batch(s, *batches[s.step_in_epoch])
            logs, logits = optimize(s, x, y, labeled)
            s.step_in_epoch += 1
            s.step += 1
            accumulate(s, logs, logits, y, num_labeled)
            if s.step % cfg.log_every_steps == 0:
                means = fetch_pending(s)  # the interval's one host sync; raises if the loss is not finite
                s.log.scalars(s.step, {**means, "lr": s.optimizer.param_groups[0]["lr"]}, "train")
                if bar is not None:
                    acc = 100.0 * s.counts["correct"] / s.counts["labeled"] if s.counts["labeled"] else float("nan")
                    bar.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{acc:.1f}")
            if bar is not None:
                bar.update(1)
            stop = bool(cfg.max_steps) and s.step >= cfg.max_steps
            end_of_epoch = s.step_in_epoch == len(batches)
            if end_of_epoch:
                s.epoch, s.step_in_epoch = s.epoch + 1, 0
            last_step = stop or s.epoch == cfg.epochs
            if cfg.eval_every_steps:
                do_eval = last_step or s.step % cfg.eval_every_steps == 0
            else:
                do_eval = last_step or end_of_epoch
            if do_eval:
                s.test_error, score = evaluate_and_log(s)
                if bar is not None:
                    bar.set_postfix({"val_err" if cfg.val_samples else "test_err": f"{score:.2f}"})
                save_checkpoint(s, s.test_error, score)
            elif end_of_epoch or (cfg.ckpt_every_steps and s.step % cfg.ckpt_every_steps == 0):
                save_checkpoint(s, None)
            if stop or end_of_epoch:
                break
        if bar is not None:
            bar.close()
    return finish(s, score_test)


def finish(s: TrainState, score_test: bool = True) -> Dict[str, Any]:
    """The run's summary (written to summary.yaml); leaves the process group if setup() joined one."""
    cfg = s.cfg
    # s.test_error is None with a validation split (this is the test set's one look) or on resuming a finished run
    if s.test_error is None and score_test:
        s.test_error = evaluate(s.model, s.data, cfg.eval_samples, cfg.eval_batch_size)
    s.log.close()
    summary = {
        "test_error": s.test_error,
        "best_error": s.best_error,
        "best_on": "validation" if cfg.val_samples else "test",
        **({} if cfg.val_samples else {"test_error_at_best": s.test_at_best}),
        "steps": s.step,
        "epochs_done": s.epoch,
        "eval_images": cfg.eval_samples or len(s.data.test_labels),
        "train_seconds": s.elapsed_s(),
    }
    if s.rank == 0:
        write_summary(s.run_dir, summary)
    if s.joined_group:
        torch.distributed.destroy_process_group()
    return summary
