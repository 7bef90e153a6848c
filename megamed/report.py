"""Small helpers for self-contained HTML reports: 8-bit PNG tiles, tables, a loss plot, versions.

A report is one HTML file whose images are PNG files next to it, referenced by relative
paths, so the directory can be copied or committed as is (docs/quickstart/). No JavaScript,
no external CSS; matplotlib (Agg backend, no display needed) draws the one plot.
"""
from __future__ import annotations

import html
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.tile { image-rendering: pixelated; height: 128px; } figure { margin: 0; }
.note { color: #555; font-size: 0.92em; } code { background: #f4f4f4; padding: 0 3px; }
"""


def esc(text) -> str:
    return html.escape(str(text))


def save_png8(path: str | Path, img01: np.ndarray) -> Path:
    """Write [H, W] in [0, 1] as an optimised 8-bit grayscale PNG (small: for reports, not data)."""
    from PIL import Image

    img01 = np.asarray(img01, dtype=np.float32)
    if img01.ndim != 2:
        raise ValueError(f"img01: expected [H, W], got shape {img01.shape}")
    if not np.isfinite(img01).all():
        raise ValueError("img01: contains NaN or Inf")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img01, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path, optimize=True)
    return path


def table(headers: list[str], rows: list[list], numeric: set[int] | None = None) -> str:
    """An HTML table; cells are escaped; columns in `numeric` are right-aligned."""
    numeric = numeric or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table: row has {len(row)} cells, headers have {len(headers)}")
        cells = "".join(f"<td class=num>{esc(c)}</td>" if i in numeric else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def image(src: str, alt: str, cls: str = "tile") -> str:
    return f'<img class="{cls}" src="{esc(src)}" alt="{esc(alt)}">'


def page(title: str, body: str) -> str:
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def plot_loss(steps, losses, path: str | Path, title: str = "training loss") -> Path:
    """Loss (raw, and a running mean over ~10% of the points) against step -> PNG."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the loss plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    steps, losses = np.asarray(steps, float), np.asarray(losses, float)
    if steps.shape != losses.shape or steps.size == 0:
        raise ValueError(f"steps and losses must be non-empty and the same length, got {steps.size}, {losses.size}")
    k = max(1, steps.size // 10)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")  # [N - k + 1]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.45, label="loss (logged steps)")
    ax.plot(steps[k - 1:], smooth, lw=2, label=f"running mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def git_commit(repo: str | Path | None = None) -> str:
    """Short commit of the source tree (+ '-dirty'), or 'unknown' outside a git checkout."""
    repo = Path(repo) if repo else Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """What produced a report: megamed, git commit, Python, torch, numpy, platform, CPU threads."""
    import torch

    import megamed

    return {"megamed": getattr(megamed, "__version__", "unknown"), "git commit": git_commit(),
            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "torch threads": str(torch.get_num_threads()),
            "cuda": torch.version.cuda or "none (CPU)"}
