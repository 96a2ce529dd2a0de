"""The PNG figures: what the model renders (input/reconstruction pairs, the rendered template at every level,
sampled images) and a run's learning curve. Plotting only; the render op itself is ``drmm_kernels.render``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor


def _to_display(img: Tensor):
    """(C, H, W) -> (H, W) or (H, W, 3) in [0, 1], each image min-max scaled (renders have arbitrary scale)."""
    img = img.detach().float().cpu()
    if img.shape[0] not in (1, 3):
        img = img.mean(0, keepdim=True)  # intermediate levels: mean over channels
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_reconstruction_grid(x: Tensor, x_hat: Tensor, path: Path, data=None) -> Path:
    """Two rows: the inputs and their reconstructions (each image scaled to its own range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8), squeeze=False)
    for i in range(n):
        for row, (t, title) in enumerate(((x[i], "input"), (x_hat[i], "render"))):
            ax = axes[row][i]
            ax.imshow(_to_display(t), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title)
    return _save(fig, Path(path))


def _vector_display(v: Tensor):
    """A (C,) vector as a near-square (rows, cols) grid of its values in channel order, min-max scaled to [0, 1];
    the cells past C are NaN (drawn blank)."""
    import numpy as np

    v = v.detach().float().cpu().reshape(-1)
    lo, hi = v.min(), v.max()
    v = (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)
    cols = int(np.ceil(np.sqrt(len(v))))
    rows = (len(v) + cols - 1) // cols
    grid = np.full(rows * cols, np.nan, dtype=np.float32)
    grid[: len(v)] = v.numpy()
    return grid.reshape(rows, cols)


def level_panels(levels: Sequence[Tensor], max_images: int = 8):
    """What ``save_level_grid`` draws: (column titles, rows of 2-D arrays in [0, 1], one row per example).

    A level with a 1x1 map (the class template of a model that ends in a global mean pool, e.g. conv_small's
    (10, 1, 1) mu_c) is shown as its channel vector laid out as a grid, since the channel mean of a single pixel
    is one value and its min-max scaling an all-black square. Larger maps are shown as the mean over channels.
    """
    n = min(levels[0].shape[0], max_images)
    titles = []
    for j, level in enumerate(levels):
        name = "template" if j == 0 else ("image" if j == len(levels) - 1 else f"level -{j}")
        if level.shape[-2:] == (1, 1) and level.shape[1] > 1:
            name += f"\n({level.shape[1]} channels)"
        titles.append(name)
    rows = [
        [
            _vector_display(level[i]) if level.shape[-2:] == (1, 1) and level.shape[1] > 1 else _to_display(level[i])
            for level in levels
        ]
        for i in range(n)
    ]
    return titles, rows


def save_level_grid(levels: Sequence[Tensor], path: Path, max_images: int = 8) -> Path:
    """One row per example, one column per level: the class template mu_c at the left (a 1x1 template shown as
    its grid of channel values, see ``level_panels``; cells past the last channel are pale red), the signal
    rendered down through the example's switches, the rendered image at the right. Each panel is min-max scaled on
    its own (renders have arbitrary scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles, rows = level_panels(levels, max_images)
    cmap = plt.get_cmap("gray").with_extremes(bad="#f2c4c4")  # the unused cells of a template grid: pale red
    n = len(rows)
    fig, axes = plt.subplots(n, len(levels), figsize=(1.4 * len(levels), 1.4 * n + 0.2), squeeze=False)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = axes[i][j]
            ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    return _save(fig, Path(path))


def save_image_grid(images: Tensor, path: Path, titles: Optional[Sequence[str]] = None, ncols: int = 8) -> Path:
    """A grid of images, each scaled to its own range (renders have arbitrary scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.4 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if k < n:
            ax.imshow(_to_display(images[k]), cmap="gray")
            if titles is not None:
                ax.set_title(titles[k], fontsize=8)
        else:
            ax.axis("off")
    return _save(fig, Path(path))


def plot_learning_curve(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """Validation error (test error when the run has no validation split) and the training loss parts against the
    step, from metrics.csv rows (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    split = "val" if rows[-1].get("val_error") not in ("", None) else "test"
    ax1.plot(
        steps,
        [float(r[f"{split}_error"]) if r[f"{split}_error"] not in ("", None) else float("nan") for r in rows],
        marker="o",
    )
    ax1.set_xlabel("step"), ax1.set_ylabel(f"{split} error (%)"), ax1.set_title(f"{split} error")
    ax1.grid(alpha=0.3)
    for key in ("loss", "ce", "rc", "kl", "klm", "nn"):
        vals = [float(r[key]) if r.get(key) not in ("", None) else float("nan") for r in rows]
        if any(v == v for v in vals):  # klm only exists with kl_marginal_weight > 0
            ax2.plot(steps, vals, label=key)
    ax2.set_xlabel("step"), ax2.set_title("training loss (mean since last eval)"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
