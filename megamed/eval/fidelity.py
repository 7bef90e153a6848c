"""Fidelity and diversity of generated images against a reference set.

    fid(a [N, D], b [M, D])                  Fréchet distance of Gaussians fitted to two feature sets
    kid(a, b)                                Kernel Inception Distance: unbiased MMD^2, cubic kernel
    precision_recall(real, fake, k=3)        Kynkäänniemi et al. 2019 k-NN manifold estimate
    ms_ssim(x, y)                            multi-scale SSIM (Wang et al. 2003), 5 scales
    within_prompt_diversity(images, prompts) mean pairwise MS-SSIM among images of one prompt
    evaluate_fidelity(reference, generated)  all of the above on two image folders -> dict

Features come from megamed.eval.features (an Extractor, pinned by a weights hash).
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)


def _features(x, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {a.shape}")
    if len(a) < min_n:
        raise ValueError(f"{name}: need at least {min_n} feature vectors, got {len(a)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return a


# -----------------------------------------------------------------------------------------
# FID

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2): eigh is stable where sqrtm of the
    non-symmetric S1 S2 returns complex round-off for rank-deficient covariances (N < D).
    Linear algebra runs in torch float64 (it honours torch.set_num_threads; numpy's OpenBLAS
    oversubscribes a busy machine: 50x slower on a shared 2-core box)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(v, np.float64)) for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mu/sigma: shapes {tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, "
                         f"{tuple(s2.shape)} do not match")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T                          # S1^(1/2)
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def _mean_cov(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and sample covariance (ddof=1) [D, D] of features [N, D], in torch float64."""
    t = torch.as_tensor(x)
    c = t - t.mean(0)
    return t.mean(0), c.T @ c / (len(t) - 1)


def fid(a, b) -> float:
    """FID between two feature sets [N, D] and [M, D] (sample covariances, ddof=1).

    With fewer images than feature dimensions the covariances have rank < D, and the trace term
    is computed from the samples instead: with centred A [N, D], B [M, D],
    S1 S2 = A^T A B^T B / ((N-1)(M-1)) has the nonzero spectrum of (B A^T)(B A^T)^T / (...), so
    tr (S1 S2)^(1/2) = nuclear norm of B A^T / sqrt((N-1)(M-1)): one small SVD, no D x D eigh."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a/b: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*_mean_cov(a), *_mean_cov(b))
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    mu1, mu2 = ta.mean(0), tb.mean(0)
    ca, cb = ta - mu1, tb - mu2                                          # [N, D], [M, D]
    tr1, tr2 = (ca * ca).sum() / (len(a) - 1), (cb * cb).sum() / (len(b) - 1)   # tr S1, tr S2
    tr_covmean = torch.linalg.svdvals(cb @ ca.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_covmean)


# -----------------------------------------------------------------------------------------
# KID

def mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(u, v) = (u.v / D + coef0)^degree:
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)                   # torch matmuls: see frechet_distance
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(a, b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std of mmd2_unbiased over `subsets` random subsets of
    min(subset_size, N, M) rows from each set (without replacement). Unbiased: zero in expectation
    when both sets come from the same distribution (so it can be slightly negative)."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a/b: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets/subset_size: need >= 1 and >= 2, got {subsets}, {subset_size}")
    n = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = [mmd2_unbiased(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


# -----------------------------------------------------------------------------------------
# precision / recall (k-NN manifolds)

def _cdist_chunks(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024):
    for i in range(0, len(x), chunk):
        yield i, torch.cdist(x[i:i + chunk], y)


def knn_radii(x, k: int = 3) -> np.ndarray:
    """Distance from each row of x [N, D] to its k-th nearest OTHER row -> [N]."""
    x = torch.as_tensor(_features(x, "x", min_n=k + 1))
    out = torch.empty(len(x), dtype=x.dtype)
    for i, d in _cdist_chunks(x, x):
        # the k+1 smallest include the point itself at distance 0
        out[i:i + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out.numpy()


def coverage_share(points, centres, radii) -> float:
    """Share of points inside at least one ball (centre_j, radius_j)."""
    p, c = torch.as_tensor(points), torch.as_tensor(centres)
    r = torch.as_tensor(radii)
    hit = torch.zeros(len(p), dtype=torch.bool)
    for i, d in _cdist_chunks(p, c):
        hit[i:i + len(d)] = (d <= r[None]).any(1)
    return float(hit.double().mean())


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019). Each set's manifold is the union of
    balls around its points with radius = distance to the k-th nearest neighbour in the same set.
    precision = share of fake inside the real manifold (are the fakes realistic?);
    recall    = share of real inside the fake manifold (do the fakes cover the reals?)."""
    real, fake = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real/fake: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")
    return (coverage_share(fake, real, knn_radii(real, k)), coverage_share(real, fake, knn_radii(fake, k)))


# -----------------------------------------------------------------------------------------
# MS-SSIM

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang et al. 2003, 5 scales
MS_SSIM_MIN_SIZE = 161                                        # 161 / 2^4 = 10 px at scale 5 (window shrunk to 9 there)


def _gauss_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()                                          # [size]


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of [B, 1, H, W] -> [B, 1, H - n + 1, W - n + 1]."""
    n = len(win)
    x = F.conv2d(x, win.view(1, 1, n, 1).to(x))
    return F.conv2d(x, win.view(1, 1, 1, n).to(x))


def ssim_parts(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 11,
               sigma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per image: ([B], [B]) for [B, 1, H, W] inputs.
    Windows that do not fit a small image shrink to the largest odd size that does."""
    n = min(win_size, min(x.shape[-2:]))
    n -= (n + 1) % 2                                           # odd
    win = _gauss_window(n, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, win), _blur(y, win)
    sxx = _blur(x * x, win) - mx ** 2
    syy = _blur(y * y, win) - my ** 2
    sxy = _blur(x * y, win) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs
    return ssim.mean((1, 2, 3)), cs.mean((1, 2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """MS-SSIM of image pairs [B, 1, H, W] (or [H, W]) -> [B] in [0, 1] (1 = identical).

    prod_{j<5} cs_j^w_j * ssim_5^w_5 with 2x average pooling between scales. Negative cs/ssim
    (anti-correlated patches) are clamped to 0 so fractional powers stay real. data_range = 2 for
    [-1, 1] images. Both sides must be >= MS_SSIM_MIN_SIZE px."""
    if x.shape != y.shape:
        raise ValueError(f"x/y: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
    if x.ndim == 2:
        x, y = x[None, None], y[None, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x: expected [B, 1, H, W] or [H, W], got {tuple(x.shape)}")
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIZE:
        raise ValueError(f"x: MS-SSIM needs images >= {MS_SSIM_MIN_SIZE} px a side (5 scales), got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    w = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64)
    terms = []
    for j in range(len(w)):
        ssim, cs = ssim_parts(x, y, data_range)
        terms.append((ssim if j == len(w) - 1 else cs).clamp(min=0))
        if j != len(w) - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(terms, 1).pow(w).prod(1)               # [B]


def within_prompt_diversity(images, prompts: list[str], max_pairs: int = 50, seed: int = 0) -> dict:
    """Mean pairwise MS-SSIM among images sharing a prompt (lower = more diverse), averaged over
    prompts with >= 2 images; at most max_pairs random pairs per prompt.
    images: [N, 1, S, S] in [-1, 1], or a data set whose items have "image" [1, S, S] (read on
    demand, so a large set is never held in memory). Returns {"ms_ssim", "prompts", "pairs"}."""
    if len(images) != len(prompts):
        raise ValueError(f"images/prompts: lengths differ ({len(images)} vs {len(prompts)})")
    if isinstance(images, torch.Tensor):
        get = lambda ids: images[ids]                                    # noqa: E731
    else:
        get = lambda ids: torch.stack([images[i]["image"] for i in ids])   # noqa: E731
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    rng = np.random.default_rng(seed)
    per_prompt, n_pairs = [], 0
    for p, idx in tqdm(sorted(groups.items()), desc="MS-SSIM", unit="prompt", leave=False):
        pairs = list(itertools.combinations(idx, 2))
        if not pairs:
            continue
        if len(pairs) > max_pairs:
            pairs = [pairs[i] for i in rng.choice(len(pairs), max_pairs, replace=False)]
        i, j = map(list, zip(*pairs))
        per_prompt.append(float(ms_ssim(get(i), get(j)).mean()))
        n_pairs += len(pairs)
    return {"ms_ssim": float(np.mean(per_prompt)) if per_prompt else math.nan,
            "prompts": len(per_prompt), "pairs": n_pairs}


# -----------------------------------------------------------------------------------------
# the whole report on two folders

def open_images(root, size: int, split: str | None = None) -> tuple:
    """(data set, prompts, paths) of an image folder: megamed layout, CheXpert, or a plain folder
    (loaders.open_dataset), items resized to size x size. Nothing is decoded yet. A plain folder's
    prompt is the PNG's "prompt" text chunk when it has no .txt sidecar (what `megamed sample`
    writes). A plain folder has no splits: `split` is then ignored, with a warning."""
    from megamed.data.images import read_png_text
    from megamed.data.loaders import detect_kind, open_dataset

    if split and detect_kind(root) == "folder":
        log.warning("%s is a plain folder (no splits): using all of its images, not only %r", root, split)
        split = None
    ds = open_dataset(root, size=size, **({"split": split} if split else {}))
    paths = [r["image_path"] for r in ds.rows]
    prompts = [r["prompt"] or (read_png_text(path).get("prompt", "") if path.lower().endswith(".png") else "")
               for r, path in zip(ds.rows, paths)]
    return ds, prompts, paths


def evaluate_fidelity(reference, generated, extractor=None, size: int = 256, reference_split: str | None = None,
                      k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID, KID, precision/recall (feature space of `extractor`, an Extractor or a spec) and
    within-prompt MS-SSIM of generated vs reference (MS-SSIM needs size >= 161; skipped below).
    Images are streamed: only features are kept."""
    from megamed.eval.features import extract, get_extractor

    ext = extractor if hasattr(extractor, "sha256") else get_extractor(extractor)
    ref, ref_prompts, _ = open_images(reference, size, reference_split)
    gen, gen_prompts, _ = open_images(generated, size)
    fr, fg = extract(ext, ref, desc="reference features"), extract(ext, gen, desc="generated features")
    kid_mean, kid_std = kid(fr, fg, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(fr, fg, k)
    out = {"extractor": ext.name, "extractor_sha256": ext.sha256, "extractor_note": ext.note, "size": size,
           "n_reference": len(fr), "n_generated": len(fg), "feature_dim": int(fr.shape[1]),
           "fid": fid(fr, fg), "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall, "k": k}
    if size >= MS_SSIM_MIN_SIZE:
        out["ms_ssim_generated"] = within_prompt_diversity(gen, gen_prompts)
        out["ms_ssim_reference"] = within_prompt_diversity(ref, ref_prompts)
    else:
        out["ms_ssim_skipped"] = f"size {size} < {MS_SSIM_MIN_SIZE}"
    return out


def fidelity_markdown(r: dict) -> str:
    from megamed.eval.features import extractor_line

    lines = ["# Fidelity and diversity", "",
             extractor_line(r),
             f"Images at {r['size']} px: {r['n_reference']} reference, {r['n_generated']} generated; "
             f"{r['feature_dim']}-d features.",
             "", "| metric | value |", "|---|---|",
             f"| FID | {r['fid']:.4f} |", f"| KID | {r['kid']:.5f} ± {r['kid_std']:.5f} |",
             f"| precision (k={r['k']}) | {r['precision']:.4f} |", f"| recall (k={r['k']}) | {r['recall']:.4f} |"]
    for key in ("ms_ssim_generated", "ms_ssim_reference"):
        if key in r:
            d = r[key]
            value = (f"{d['ms_ssim']:.4f} ({d['prompts']} prompts, {d['pairs']} pairs)" if d["pairs"]
                     else "n/a (no prompt has 2+ images)")
            lines.append(f"| within-prompt MS-SSIM, {key.split('_')[-1]} (lower = more diverse) | {value} |")
    if "ms_ssim_skipped" in r:
        lines.append(f"| within-prompt MS-SSIM | skipped: {r['ms_ssim_skipped']} |")
    return "\n".join(lines) + "\n"


__all__ = ["fid", "frechet_distance", "kid", "mmd2_unbiased", "precision_recall", "knn_radii", "ms_ssim",
           "ssim_parts", "within_prompt_diversity", "evaluate_fidelity", "fidelity_markdown", "open_images",
           "MS_SSIM_WEIGHTS", "MS_SSIM_MIN_SIZE"]
