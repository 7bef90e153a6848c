"""Memorisation: is a generated image a near copy of a training image?

For every generated image g, its nearest reference TRAINING image r, in two spaces:
  feature space  L2 between extractor features (megamed.eval.features)
  pixel space    RMS difference of the images at 64 x 64 in [-1, 1]
and, as the yardstick, each training image's leave-one-out nearest-neighbour distance within the
training set (how close two *different* training images get). A generated image is flagged in a
space when d(g, r) is below the `quantile` of those leave-one-out distances: a model that samples
new images from the training distribution gets a share near `quantile`; copies of training
images sit at distance ~0 and are all flagged. `ratio` = d(g, r) / d_loo(r) (< 1: g is closer to
r than any other training image is) ranks the pairs shown in the PNG.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

PIXEL_SIZE = 64


def nearest(query, ref, exclude_self: bool = False, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Nearest row of ref [R, D] for each row of query [Q, D] -> (distance [Q], index [Q]).
    exclude_self: query IS ref, and each row's own match (the diagonal) is skipped (leave-one-out)."""
    q = torch.as_tensor(np.asarray(query, dtype=np.float64))
    r = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"query/ref: expected [Q, D] and [R, D], got {tuple(q.shape)} and {tuple(r.shape)}")
    if len(r) < (2 if exclude_self else 1):
        raise ValueError(f"ref: need at least {2 if exclude_self else 1} rows, got {len(r)}")
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self: query and ref must be the same set")
    dist, idx = np.empty(len(q)), np.empty(len(q), dtype=np.int64)
    for i in tqdm(range(0, len(q), chunk), desc="nearest", unit="chunk", leave=False, disable=len(q) <= chunk):
        d = torch.cdist(q[i:i + chunk], r)                               # [c, R]
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + i] = math.inf
        m = d.min(1)
        dist[i:i + len(d)], idx[i:i + len(d)] = m.values.numpy(), m.indices.numpy()
    return dist, idx


def pixel_vectors(images: torch.Tensor, size: int = PIXEL_SIZE) -> np.ndarray:
    """[N, 1, H, W] -> [N, size*size] area-downsampled pixels scaled so L2 = RMS difference."""
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return (x.flatten(1) / size).double().numpy()


def scan(extractor, ds, batch_size: int = 32, desc: str = "images") -> tuple[np.ndarray, np.ndarray]:
    """One streaming pass over a data set: (features [N, D], pixel vectors [N, 64*64]); images
    are not kept, so the reference can be larger than memory allows for pixels at full size."""
    from megamed.eval.features import batched

    feats, pixels = [], []
    for b in tqdm(batched(ds, batch_size), desc=desc, unit="batch", total=-(-len(ds) // batch_size), leave=False):
        feats.append(extractor(b.float()).double().cpu().numpy())
        pixels.append(pixel_vectors(b))
    return np.concatenate(feats), np.concatenate(pixels)


def memorisation_stats(gen, ref, quantile: float = 0.05) -> dict:
    """One space: nearest training item per generated item and the share below the yardstick.
    gen [G, D], ref [R, D] (R >= 2). Returns numpy arrays "distance", "index", "ratio" [G] and
    "threshold", "share", "loo" [R] (training set's leave-one-out NN distances)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: must be in (0, 1), got {quantile}")
    loo, _ = nearest(ref, ref, exclude_self=True)
    dist, idx = nearest(gen, ref)
    threshold = float(np.quantile(loo, quantile))
    ratio = dist / np.maximum(loo[idx], 1e-12)
    return {"distance": dist, "index": idx, "ratio": ratio, "loo": loo, "threshold": threshold,
            "share": float((dist < threshold).mean())}


def pairs_png(path, gen, ref, pairs: list[tuple[int, int]], labels: list[str] | None = None, tile: int = 128) -> None:
    """A PNG with one row per (generated, reference) pair: generated left, reference right.
    gen/ref: [N, 1, S, S] tensors or data sets whose items have "image" (only the pairs are read)."""
    from PIL import Image, ImageDraw

    sheet = Image.new("L", (2 * tile + 6, len(pairs) * (tile + 16) + 2), 255)
    draw = ImageDraw.Draw(sheet)
    for row, (g, r) in enumerate(pairs):
        y = row * (tile + 16) + 14
        for col, img in enumerate((gen[g], ref[r])):
            img = img["image"] if isinstance(img, dict) else img                  # [1, S, S]
            x = F.interpolate(img[None].float(), size=(tile, tile), mode="area")[0, 0]
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            sheet.paste(Image.fromarray(arr, "L"), (2 + col * (tile + 2), y))
        draw.text((2, y - 13), labels[row] if labels else f"gen {g} | ref {r}", fill=0)
    sheet.save(path)


def evaluate_memorisation(reference, generated, extractor=None, size: int = 256, reference_split: str | None = "train",
                          quantile: float = 0.05, out_png=None, n_pairs: int = 8) -> dict:
    """Nearest training image of every generated image in feature and pixel space (see module doc).
    reference_split "train" reads only the training rows of a megamed-layout / CheXpert reference
    (a plain folder has no splits: pass None). Writes the n_pairs closest pairs (feature-space
    ratio) to out_png when given."""
    from megamed.eval.features import get_extractor
    from megamed.eval.fidelity import open_images

    ext = extractor if hasattr(extractor, "sha256") else get_extractor(extractor)
    ref, _, ref_paths = open_images(reference, size, reference_split)
    gen, _, gen_paths = open_images(generated, size)
    if len(ref) < 2:
        raise ValueError(f"reference: need at least 2 training images, got {len(ref)}")
    ref_feat, ref_pix = scan(ext, ref, desc="reference")
    gen_feat, gen_pix = scan(ext, gen, desc="generated")
    feat = memorisation_stats(gen_feat, ref_feat, quantile)
    pix = memorisation_stats(gen_pix, ref_pix, quantile)
    order = np.argsort(feat["ratio"])[:n_pairs]
    closest = [{"generated": gen_paths[g], "reference": ref_paths[feat["index"][g]],
                "feature_distance": float(feat["distance"][g]), "feature_ratio": float(feat["ratio"][g]),
                "pixel_distance": float(pix["distance"][g]), "pixel_reference": ref_paths[pix["index"][g]]}
               for g in order]
    if out_png is not None:
        pairs_png(out_png, gen, ref, [(int(g), int(feat["index"][g])) for g in order],
                  [f"#{g} ratio {feat['ratio'][g]:.2f}" for g in order])
    return {"extractor": ext.name, "extractor_sha256": ext.sha256, "extractor_note": ext.note, "size": size,
            "n_reference": len(ref), "n_generated": len(gen), "quantile": quantile,
            "feature": {"share": feat["share"], "threshold": feat["threshold"],
                        "share_ratio_below_1": float((feat["ratio"] < 1).mean()),
                        "median_distance": float(np.median(feat["distance"]))},
            "pixel": {"share": pix["share"], "threshold": pix["threshold"],
                      "share_ratio_below_1": float((pix["ratio"] < 1).mean()),
                      "median_distance": float(np.median(pix["distance"]))},
            "flagged_both": [gen_paths[g] for g in np.flatnonzero((feat["distance"] < feat["threshold"])
                                                                  & (pix["distance"] < pix["threshold"]))],
            "closest": closest}


def memorisation_markdown(r: dict) -> str:
    q = r["quantile"]
    from megamed.eval.features import extractor_line

    lines = ["# Memorisation", "",
             extractor_line(r),
             f"{r['n_generated']} generated vs {r['n_reference']} training images at {r['size']} px.",
             f"Flagged: nearest-training distance below the {q:.0%} quantile of the training set's own "
             f"leave-one-out nearest-neighbour distances (expect about {q:.0%} without memorisation).", "",
             "| space | share flagged | threshold | median NN distance | share closer than the neighbour's own NN |",
             "|---|---|---|---|---|"]
    for space in ("feature", "pixel"):
        s = r[space]
        lines.append(f"| {space} | {s['share']:.1%} | {s['threshold']:.4g} | {s['median_distance']:.4g} "
                     f"| {s['share_ratio_below_1']:.1%} |")
    lines += ["", f"Flagged in both spaces: {len(r['flagged_both'])}", "", "Closest pairs (feature space):", ""]
    lines += [f"- `{c['generated']}` ~ `{c['reference']}` (ratio {c['feature_ratio']:.3f})" for c in r["closest"]]
    return "\n".join(lines) + "\n"


__all__ = ["nearest", "memorisation_stats", "pixel_vectors", "scan", "pairs_png", "evaluate_memorisation",
           "memorisation_markdown"]
