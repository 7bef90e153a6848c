"""Does the judge look at the finding? Localisation of an LSE judge on the example set.

An LSE-pooled judge (ClassifierConfig.pool="lse") has a logit per label at every cell of its
last feature map ([B, 14, h, w], 8 x 8 at 256 px). The example set knows each finding's box in
the image (metadata.csv regions). Two reads of the same thing:

  pointing game   per finding, over the images that have it: the share whose highest cell for
                  that label overlaps the finding's box (Zhang et al. 2016). Two baselines:
                  "chance", the mean share of cells the box overlaps (a random cell), and
                  "fixed", the best single cell for every image (a pointer that only knows
                  where the finding usually is: the heart is always in the same place, so
                  a shuffled-label judge scores ~1 on cardiomegaly; a nodule is anywhere).
  figure          localization.png: per finding, a few images with the box drawn and the
                  label's cell probabilities laid over them (red = high).

A judge that scores a nodule right while pointing elsewhere has learned a correlate, not the
finding: an LSE judge trained without boxes called lesions from "dense lung" elsewhere, and
pointed at the nodule less often than the fixed pointer (docs/eval/judge.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megamed.data.layout import OBSERVATIONS
from megamed.eval.classifier import FINDING_NAMES, cell_targets


def pointing_game(cell_argmax: np.ndarray, grid: tuple[int, int], boxes: np.ndarray,
                  names=FINDING_NAMES) -> dict:
    """cell_argmax [N, 14] (flat index of each label's highest cell), grid (h, w), boxes [N, 14, 4]
    (NaN = finding absent or box unknown) -> {finding: {"n", "hit_rate", "chance", "fixed"}} (None when n = 0)."""
    h, w = grid
    out = {}
    for name in names:
        k = OBSERVATIONS.index(name)
        known = ~np.isnan(boxes[:, k]).any(-1)
        n = int(known.sum())
        if n == 0:
            out[name] = {"n": 0, "hit_rate": None, "chance": None, "fixed": None}
            continue
        t = cell_targets(torch.from_numpy(boxes[known, k]).double(), h, w).flatten(1)   # [n, h*w]
        hit = t[torch.arange(n), torch.from_numpy(cell_argmax[known, k]).long()]
        out[name] = {"n": n, "hit_rate": float(hit.mean()), "chance": float(t.mean()), "fixed": float(t.mean(0).max())}
    return out


def localization_markdown(scores: dict) -> list[str]:
    lines = ["Pointing game (the label's highest cell overlaps the finding's box; chance = share of cells "
             "the box covers; fixed = the best single cell for all images, i.e. knowing only where the finding "
             "usually lies):", "", "| finding | n | hit rate | chance | fixed |", "|---|---|---|---|---|"]
    for name, s in scores.items():
        if s["n"]:
            lines.append(f"| {name} | {s['n']} | {s['hit_rate']:.3f} | {s['chance']:.3f} | {s['fixed']:.3f} |")
    return lines


@torch.no_grad()
def localization_figure(model, ds, boxes: np.ndarray, path: str | Path, per_finding: int = 4,
                        names=FINDING_NAMES, device: str = "cpu") -> Path:
    """localization.png: a row per finding, `per_finding` images that have it (the first in the
    split with a known box), the box in green, the label's per-cell probability in red.
    ds: a loaders data set (items "image" [1, H, W] in [-1, 1]); boxes [N, 14, 4] in ds order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = []
    for name in names:
        k = OBSERVATIONS.index(name)
        idx = np.flatnonzero(~np.isnan(boxes[:, k]).any(-1))[:per_finding]
        if len(idx):
            rows.append((name, k, idx))
    if not rows:
        raise ValueError("no image with a known finding box (metadata.csv regions): nothing to draw")
    model.eval().to(device)
    fig, axes = plt.subplots(len(rows), per_finding, figsize=(2.1 * per_finding, 2.25 * len(rows)), dpi=100,
                             squeeze=False)
    for r, (name, k, idx) in enumerate(rows):
        for c in range(per_finding):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(idx):
                continue
            x = ds[int(idx[c])]["image"][None].to(device)                       # [1, 1, H, W]
            cells = torch.sigmoid(model(x)["cell_logits"][0, k]).cpu().numpy()   # [h, w]
            ax.imshow(x[0, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1, extent=(0, 1, 1, 0))
            ax.imshow(cells, cmap="Reds", vmin=0, vmax=1, alpha=0.45, extent=(0, 1, 1, 0), interpolation="nearest")
            x0, y0, x1, y1 = boxes[idx[c], k]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#2ecc40", linewidth=1.2))
            inside = cell_targets(torch.from_numpy(boxes[idx[c], k]).double(), *cells.shape).flatten()
            hit = bool(inside[int(cells.argmax())])
            ax.set_title(f"{name if c == 0 else ''}\n{'hit' if hit else 'miss'}, top cell p={cells.max():.2f}",
                         fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["pointing_game", "localization_markdown", "localization_figure"]
