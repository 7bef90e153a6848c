"""The augmentation experiment (`megamed eval augment`): do generated images help a classifier
that has few reference images?

For every reference subset (a fraction of the reference TRAIN split, or N images per class) and
every seed, the judge classifier (megamed.eval.classifier) is trained twice from scratch, with
the same seed and the same subset:

    without   the subset's reference images
    with      the same images + K generated images per label, for the labels with the fewest
              positives in the subset first (all labels unless --generated-labels M)

Both arms early-stop on the reference VAL split and are scored on the held-out reference TEST
split (never val). The gain (with - without) is paired: same seed, same subset, same test images;
its 95% confidence interval comes from a paired bootstrap over the test images (one resample
of test images is applied to both arms and all seeds; seeds are averaged in every replicate, so
the CI is about which test images were drawn, and the spread over seeds is reported as ± std).

Choices (and why):
  * a seed fixes the subset (a seeded permutation of the train split: the 10% subset of a seed
    contains its 5% subset) and the classifier's initialisation and batch order; so the ± std over
    seeds includes which images were drawn, the larger source of variance in low-data regimes.
  * a label's prompt is what the reference data calls an image with that label and as little else
    as possible: the most frequent set of positive labels among train rows with that label, of the
    smallest size (so "cardiomegaly" also carries the "enlarged cardiomediastinum" the data set
    always pairs with it); the prompts (views included) are taken in turn from the train rows with
    exactly that set. This reads the labels and prompts of the whole train split, never its images:
    a prompt vocabulary is the generator's property.
  * the generated images' labels are the labels they were prompted with (the other 13 negative).
  * pools: one generated pool per prompt under OUT/generated/<labels>/ (megamed generate's layout:
    resumable, provenance in every PNG); image i of a pool has a fixed seed, so every subset and
    seed uses the same first K images of a pool. Which labels are augmented is decided per subset
    from its positives averaged over the seeds, so all seeds of a subset share one generated set.
  * an "epoch" is at least `epoch_items` images (the train set is repeated whole), so both arms
    take the same number of optimizer steps per epoch unless the real + generated set is larger.
    Without it a 26-image subset would get 2 steps per epoch and the comparison would measure
    training length, not data.
  * sampling is plain shuffling by default (--balanced for class-balanced sampling): adding
    generated images of rare labels then also rebalances the labels, which is part of what the
    experiment measures.
  * the generator may have been trained on the whole train split (the shipped one was), so the
    "with" arm transfers information from train images outside the subset: that is the claim
    under test (the seeds' MegaMed experiment is set up the same way). The test split is held out
    from both the generator and the classifier.

Profiles (defaults; any flag overrides them):
  cpu  (default) 64² small DenseNet (growth 16, blocks 2,2,2,2: 108k parameters), fractions
       5/10/25/100%, 20 generated images per label, seeds 0,1,2, epochs of >= 512 images, up to
       30 epochs (patience 6), lr 3e-3. With the shipped 128² model and a 640-image example set:
       ~200 generated images + 24 trainings, about 30 minutes on 2 CPU cores:
         megamed data example --out EX --count 640 --size 128 --bodies 32 --workers 2
         megamed eval augment --reference EX --model megamed/pretrained/small --out AUG
  gpu  the paper-scale run: DenseNet-121 at 512², 100 reference images per label, 2000 generated
       per label (the seeds' MegaMed setting), seeds 0-4, up to 50 epochs of >= 2048 images,
       lr 1e-4, batch 32, 8 loader workers, on CUDA:
         megamed eval augment --profile gpu --reference DATA --model MODEL --out AUG

Resumable: OUT/cells/<subset>/seed<k>/<arm>/cell.json is written last, after the classifier and
the test predictions; a rerun skips finished cells (and refuses cells made with other settings).
Outputs: OUT/augment.json, OUT/augment.md, OUT/augment_mean.png, OUT/augment_gain.png.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from megamed.data.layout import OBSERVATIONS
from megamed.eval.classifier import (ClassifierConfig, DenseNetClassifier, TrainConfig, load_classifier, open_split,
                                     predict, train_classifier)
from megamed.eval.metrics import auroc, f1

log = logging.getLogger(__name__)

ARMS = ("without", "with")


# -----------------------------------------------------------------------------------------
# configuration and profiles

@dataclass
class AugmentConfig:
    reference: str = ""                       # reference data set (megamed layout or CheXpert folder)
    model: str = ""                           # generator: model dir or training run dir
    generated: str = ""                       # instead of generating: an existing generated data set
    profile: str = "cpu"
    fractions: tuple = (0.05, 0.1, 0.25, 1.0)  # fractions of the reference train split ...
    per_class: tuple = ()                     # ... or N reference images per label (overrides fractions)
    generated_per_class: int = 20             # K generated images per augmented label
    generated_labels: int = 0                 # augment only the M labels rarest in the subset (0 = all)
    seeds: tuple = (0, 1, 2)
    size: int = 64                            # classifier input size (images are resized to it)
    classifier: ClassifierConfig = field(default_factory=lambda: ClassifierConfig.tiny(growth=16, init_features=32,
                                                                                       bn_size=4))
    epochs: int = 30
    patience: int = 6
    batch_size: int = 16
    lr: float = 3e-3
    epoch_items: int = 512                    # an epoch is at least this many images (train set repeated)
    balanced: bool = False
    uncertain: str = "ignore"
    threshold: float = 0.5                    # probability threshold for F1
    bootstrap: int = 1000                     # bootstrap replicates for the gain's CI
    gen_steps: int = 20
    guidance: float = 3.0
    gen_size: int = 0                         # generated resolution (0 = the model's default)
    gen_batch: int = 8
    gen_seed: int = 0
    device: str = "cpu"
    workers: int = 0
    cache_mb: int = 2048                      # decoded images kept in memory (0 = none)

    def __post_init__(self):
        if isinstance(self.classifier, dict):
            from megamed.utils.dataclass_json import from_dict
            self.classifier = from_dict(ClassifierConfig, self.classifier, where="classifier")
        self.fractions = tuple(float(f) for f in self.fractions)
        self.per_class = tuple(self.per_class)
        self.seeds = tuple(self.seeds)
        if self.profile not in PROFILES:
            raise ValueError(f"profile: {self.profile!r} is not one of {', '.join(PROFILES)}")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fractions: {f:g} is outside (0, 1]")
        if not self.per_class and not self.fractions:
            raise ValueError("fractions/per_class: give at least one fraction or one per-class count")
        for name, vals in (("fractions", self.fractions), ("per_class", self.per_class), ("seeds", self.seeds)):
            if len(set(vals)) != len(vals):
                raise ValueError(f"{name}: repeated value in {vals}")
        for n in self.per_class:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"per_class: expected positive integers, got {n!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds: expected one or more non-negative integers, got {self.seeds!r}")
        for name in ("generated_per_class", "epochs", "patience", "batch_size", "epoch_items", "bootstrap",
                     "gen_steps", "gen_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("generated_labels", "gen_size", "workers", "cache_mb", "gen_seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if self.size < 32:
            raise ValueError(f"size: the classifier needs images of at least 32 px, got {self.size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold: must be in (0, 1), got {self.threshold}")
        if not self.reference:
            raise ValueError("reference: give the reference data set (--reference DIR)")
        if not self.model and not self.generated:
            raise ValueError("model: give the generator (--model DIR) or images generated earlier (--generated DIR)")


# Defaults per profile; explicit settings override them (see config_for).
PROFILES = {
    # ~30 min on 2 CPU cores with the shipped 128² model and a 640-image example set: 10 prompts x
    # 20 generated images, 4 fractions x 3 seeds x 2 arms = 24 trainings of a 108k-parameter
    # DenseNet at 64². Measured on that set (full train split, 1 thread): ClassifierConfig.tiny()
    # (17k) reached test mean AUROC 0.68 after 30 epochs at lr 3e-3, this width 0.80; at lr 1e-3
    # both were still near 0.6 after 12 epochs. Hence the wider variant, lr 3e-3, patience 6.
    "cpu": dict(fractions=(0.05, 0.1, 0.25, 1.0), per_class=(), generated_per_class=20, seeds=(0, 1, 2), size=64,
                classifier=ClassifierConfig.tiny(growth=16, init_features=32, bn_size=4), epochs=30, patience=6,
                batch_size=16, lr=3e-3, epoch_items=512, gen_steps=20, device="cpu", workers=0, cache_mb=2048),
    # The paper-scale run (documented, not run in CI): DenseNet-121 at 512², 100 reference images
    # per label, 2000 generated per label (the seeds' MegaMed setting), 5 seeds, on a GPU.
    "gpu": dict(fractions=(), per_class=(100,), generated_per_class=2000, seeds=(0, 1, 2, 3, 4), size=512,
                classifier=ClassifierConfig(), epochs=50, patience=5, batch_size=32, lr=1e-4, epoch_items=2048,
                gen_steps=30, device="cuda", workers=8, cache_mb=0),
}


def config_for(profile: str = "cpu", **overrides) -> AugmentConfig:
    """The profile's defaults with `overrides` (None values ignored) on top."""
    if profile not in PROFILES:
        raise ValueError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    kw = dict(PROFILES[profile])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("fractions") and "per_class" not in {k for k, v in overrides.items() if v is not None}:
        kw["per_class"] = ()                  # an explicit --fractions replaces a profile's per-class
    return AugmentConfig(profile=profile, **kw)


# -----------------------------------------------------------------------------------------
# small helpers

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _clean(v):
    """JSON-safe: numpy arrays/scalars -> Python, tuples -> lists, NaN -> null."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _labels(ds) -> np.ndarray:
    """[N, 14] float labels of a loaders data set (NaN = unknown)."""
    return np.array([r["labels"] for r in ds.rows], dtype=np.float64).reshape(len(ds.rows), len(OBSERVATIONS))


def _positives(labels: np.ndarray) -> np.ndarray:
    return np.nan_to_num(labels, nan=0.0) == 1.0


def _slug(labelset: tuple) -> str:
    return "+".join(n.lower().replace(" ", "-") for n in labelset) or "none"


class _ImageCache:
    """Decoded, resized items of loaders data sets, kept until `max_bytes` is used (then new items
    are read from disk each time). Keyed by (data set, index); holds the data sets alive."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used, self.items, self.keep = max_bytes, 0, {}, {}

    def get(self, ds, i: int) -> dict:
        key = (id(ds), i)
        item = self.items.get(key)
        if item is None:
            item = ds[i]
            nbytes = item["image"].numel() * item["image"].element_size()
            if self.used + nbytes <= self.max_bytes:
                self.items[key], self.keep[id(ds)] = item, ds
                self.used += nbytes
        return dict(item)


class _Rows(torch.utils.data.Dataset):
    """Chosen items of loaders data sets, as one data set with `.rows` (what train_classifier and
    WithFindings need); item "index" is the position here. repeat: the whole list n times."""

    def __init__(self, parts: list, cache: _ImageCache, repeat: int = 1):
        self.refs = [(ds, int(i)) for ds, idx in parts for i in idx] * repeat
        self.rows = [ds.rows[i] for ds, i in self.refs]
        self.cache = cache

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, k: int) -> dict:
        ds, i = self.refs[int(k)]
        item = self.cache.get(ds, i)
        item["index"] = int(k)
        return item


# -----------------------------------------------------------------------------------------
# subsets, labels to augment, prompts

def subset_specs(cfg: AugmentConfig) -> list[dict]:
    """[{"name", "kind", "value", "title"}] in the order they are run."""
    if cfg.per_class:
        return [{"name": f"n{n}", "kind": "per_class", "value": n, "title": f"{n} per label"} for n in cfg.per_class]
    return [{"name": f"f{f:g}", "kind": "fraction", "value": f, "title": f"{100 * f:g}%"} for f in cfg.fractions]


def choose_subset(labels: np.ndarray, spec: dict, seed: int, classes: list[int]) -> np.ndarray:
    """Sorted train-split indices of one subset. The order of a seeded permutation decides, so
    for one seed smaller subsets are contained in larger ones.
    fraction f: the first max(1, round(f * N)) of the permutation.
    per_class N: for each label, rarest in the train split first, rows with that label are added
    in permutation order until the subset has N positives of it (or all there are)."""
    n = len(labels)
    perm = np.random.default_rng([seed, 0xA06]).permutation(n)
    if spec["kind"] == "fraction":
        return np.sort(perm[: max(1, round(spec["value"] * n))])
    pos = _positives(labels)
    chosen = np.zeros(n, bool)
    for c in sorted(classes, key=lambda c: (pos[:, c].sum(), c)):
        need = spec["value"] - int(pos[chosen, c].sum())
        for i in perm:
            if need <= 0:
                break
            if pos[i, c] and not chosen[i]:
                chosen[i] = True
                need -= 1
    return np.flatnonzero(chosen)


def label_prompt_sets(labels: np.ndarray, classes: list[int]) -> dict[int, tuple]:
    """{class: positive label set its prompt names}: among train rows with the class, the most
    frequent positive set of the smallest size (ties: alphabetical)."""
    pos = _positives(labels)
    out = {}
    for c in classes:
        counts: dict[tuple, int] = {}
        for row in pos[pos[:, c]]:
            key = tuple(OBSERVATIONS[j] for j in np.flatnonzero(row))
            counts[key] = counts.get(key, 0) + 1
        out[c] = min(counts, key=lambda k: (len(k), -counts[k], k))
    return out


def labels_to_augment(mean_counts: np.ndarray, classes: list[int], m: int) -> list[int]:
    """Classes by positives in the subset (mean over seeds), fewest first; the first m (0 = all)."""
    ranked = sorted(classes, key=lambda c: (mean_counts[c], OBSERVATIONS[c]))
    return ranked[:m] if m else ranked


# -----------------------------------------------------------------------------------------
# generated pools

def _pool_label_rows(labelset: tuple, train_rows: list[dict], train_labels: np.ndarray, k: int) -> list[dict]:
    """k label-CSV rows for megamed.generate: the label set's labels (others 0.0), and the prompt
    and view of the train rows that have exactly this positive set, taken in turn (so the prompts
    are worded as the generator's training data words them, views included or not)."""
    from megamed.text.prompts import prompt_from_labels

    pos = _positives(train_labels)
    want = np.array([o in labelset for o in OBSERVATIONS])
    like = sorted((r for r, p in zip(train_rows, pos) if np.array_equal(p, want)), key=lambda r: r.get("Path", ""))
    rows = []
    for i in range(k):
        row = {o: ("1.0" if o in labelset else "0.0") for o in OBSERVATIONS}
        src = like[i % len(like)] if like else {"prompt": prompt_from_labels(row)}
        row.update({"Path": "", "Frontal/Lateral": src.get("Frontal/Lateral", ""), "AP/PA": src.get("AP/PA", ""),
                    "split": "train", "prompt": src["prompt"]})
        rows.append(row)
    return rows


def make_pools(cfg: AugmentConfig, out: Path, labelsets: list[tuple], train_ds, train_labels,
               progress: bool = True) -> tuple[dict, dict]:
    """Generate (or complete) one pool of cfg.generated_per_class images per label set under
    OUT/generated/. Returns ({labelset: pool dir}, generation info for the outputs)."""
    import csv

    from megamed.generate import SamplingConfig, generate_dataset, load_pipeline

    pipe = load_pipeline(cfg.model, cfg.device)
    size = cfg.gen_size or pipe.default_resolution
    scfg = SamplingConfig(steps=cfg.gen_steps, guidance=cfg.guidance)
    dirs, stats, t0 = {}, {"generated": 0, "reused": 0}, time.time()
    for labelset in labelsets:
        pool = out / "generated" / _slug(labelset)
        pool.mkdir(parents=True, exist_ok=True)
        rows = _pool_label_rows(labelset, train_ds.rows, train_labels, cfg.generated_per_class)
        with open(pool / "labels.csv.tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (pool / "labels.csv.tmp").replace(pool / "labels.csv")
        # a pool's seeds depend only on its labels and gen_seed: pools never share noise
        seed = (cfg.gen_seed * 1_000_003 + int(_hash(labelset), 16)) % (2 ** 31)
        r = generate_dataset(pipe, pool / "labels.csv", pool, seed=seed, size=size, cfg=scfg,
                             batch_size=cfg.gen_batch, progress=progress)
        stats["generated"] += r["generated"]
        stats["reused"] += r["skipped"]
        dirs[labelset] = pool
    info = {"model": str(pipe.path), "model_hash": pipe.model_hash, "resolution": size, "sampling": asdict(scfg),
            "seconds": time.time() - t0, **stats}
    return dirs, info


def external_pool_choice(pool_labels: np.ndarray, augment: list[int], k: int) -> tuple[list[int], dict]:
    """From an existing generated data set: for each label to augment (rarest first), its first k
    rows not taken yet. Returns (row indices, {label: how many were found})."""
    pos = _positives(pool_labels)
    taken, found = [], {}
    used = np.zeros(len(pool_labels), bool)
    for c in augment:
        idx = [i for i in np.flatnonzero(pos[:, c] & ~used)][:k]
        used[idx] = True
        taken += idx
        found[OBSERVATIONS[c]] = len(idx)
    return taken, found


# -----------------------------------------------------------------------------------------
# the paired bootstrap

def bootstrap_indices(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """[B, n] indices of n items drawn with replacement, B times."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def bootstrap_weights(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """[B, n] how often each item is in each resample (counts of bootstrap_indices)."""
    idx = bootstrap_indices(n, replicates, seed)
    w = np.zeros((replicates, n), np.float64)
    np.add.at(w, (np.arange(replicates)[:, None], idx), 1.0)
    return w


def weighted_auroc(scores, labels, weights) -> np.ndarray:
    """AUROC of each resample given as item weights [B, N] (ties count 1/2; NaN labels dropped;
    NaN where a resample lacks a class). With integer counts this is metrics.auroc of the resample.

    Sorted by score, items with equal scores form groups; a positive beats the negatives of the
    groups below its own and ties half of its own group's: O(B * N)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    keep = ~np.isnan(y)
    s, y, w = s[keep], y[keep], w[:, keep]
    if len(s) == 0:
        return np.full(len(w), math.nan)
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])           # first item of each tie group
    pos_g = np.add.reduceat(w * (y == 1), starts, axis=1)           # [B, G] positive weight per group
    neg_g = np.add.reduceat(w * (y == 0), starts, axis=1)           # [B, G] negative weight per group
    below = np.cumsum(neg_g, axis=1) - neg_g                        # negatives strictly below the group
    num = (pos_g * (below + 0.5 * neg_g)).sum(1)
    den = pos_g.sum(1) * neg_g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, math.nan)


def weighted_f1(pred, labels, weights) -> np.ndarray:
    """F1 of 0/1 predictions for each resample [B, N] of weights (0 where nothing is positive)."""
    p = np.asarray(pred, np.float64)
    y = np.asarray(labels, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    keep = ~np.isnan(y)
    p, y, w = p[keep], y[keep], w[:, keep]
    tp = (w * ((p == 1) & (y == 1))).sum(1)
    fp = (w * ((p == 1) & (y == 0))).sum(1)
    fn = (w * ((p == 0) & (y == 1))).sum(1)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, 0.0)


def paired_gain(with_probs, without_probs, labels, *, replicates: int = 1000, seed: int = 0,
                threshold: float = 0.5, level: float = 0.95) -> dict:
    """Gain (with - without) in AUROC and F1, averaged over seeds, with paired bootstrap CIs.

    with_probs, without_probs: [S, N, C] test probabilities of S seeds (seed s of both arms is a
    pair); labels [N, C]. Each replicate resamples the N test images once, for both arms and all
    seeds. Returns {"auroc"|"f1": {"per_label": {"gain" [C], "lo" [C], "hi" [C]},
    "mean": {"gain", "lo", "hi"}, "replicates": [B] mean-over-labels gains}}; the mean is over the
    labels with a defined AUROC in that resample (all C for F1)."""
    a = np.asarray(with_probs, np.float64)
    b = np.asarray(without_probs, np.float64)
    y = np.asarray(labels, np.float64)
    if a.ndim != 3 or a.shape != b.shape or a.shape[1:] != y.shape:
        raise ValueError(f"with/without/labels: expected [S, N, C], [S, N, C], [N, C]; got {a.shape}, {b.shape}, "
                         f"{y.shape}")
    s_, n, c_ = a.shape
    w = np.concatenate([np.ones((1, n)), bootstrap_weights(n, replicates, seed)])   # row 0: the test set itself
    q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)
    out = {}
    for metric in ("auroc", "f1"):
        with_m = np.zeros((s_, c_, len(w)))
        without_m = np.zeros((s_, c_, len(w)))
        for s in range(s_):
            for c in range(c_):
                if metric == "auroc":
                    with_m[s, c] = weighted_auroc(a[s, :, c], y[:, c], w)
                    without_m[s, c] = weighted_auroc(b[s, :, c], y[:, c], w)
                else:
                    with_m[s, c] = weighted_f1((a[s, :, c] >= threshold).astype(float), y[:, c], w)
                    without_m[s, c] = weighted_f1((b[s, :, c] >= threshold).astype(float), y[:, c], w)
        gain = (with_m - without_m).mean(0)                             # [C, 1 + B]
        with warnings.catch_warnings():                                 # all-NaN slices: a label
            warnings.simplefilter("ignore", RuntimeWarning)             # without positives in a resample
            mean = np.nanmean(gain, axis=0)                             # [1 + B] over labels
            lo, hi = np.nanpercentile(gain[:, 1:], q, axis=1)
            mlo, mhi = np.nanpercentile(mean[1:], q)
        out[metric] = {"per_label": {"gain": gain[:, 0], "lo": lo, "hi": hi},
                       "mean": {"gain": float(mean[0]), "lo": float(mlo), "hi": float(mhi)},
                       "replicates": mean[1:]}
    return out


# -----------------------------------------------------------------------------------------
# one training cell

def _cell_key_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def run_cell(cfg: AugmentConfig, cell_dir: Path, key: dict, train_set: _Rows, val_set: _Rows, test_set: _Rows,
             seed: int, progress: bool = True) -> dict:
    """Train one classifier (or read the finished cell), predict the test split. Returns cell.json's
    contents plus "probs" [N_test, 14]."""
    done = cell_dir / "cell.json"
    key = json.loads(json.dumps(_clean(key)))         # as cell.json holds it (tuples -> lists)
    if done.is_file():
        old = json.loads(done.read_text())
        diff = _cell_key_diff(old.get("key", {}), key)
        if diff:
            raise ValueError(f"{cell_dir}: finished earlier with other settings ({', '.join(diff)}); use a new "
                             f"--out or delete that folder")
        old["probs"] = np.load(cell_dir / "test_pred.npz")["probs"]
        old["skipped"] = True
        return old
    cell_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tcfg = TrainConfig(data=cfg.reference, size=cfg.size, uncertain=cfg.uncertain, balanced=cfg.balanced,
                       epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                       workers=cfg.workers, device=cfg.device, model=cfg.classifier)
    res = train_classifier(tcfg, cell_dir, train_set, val_set, progress=progress)
    model = load_classifier(cell_dir)
    pred = predict(model, test_set, cfg.batch_size, cfg.device, desc="test", progress=progress)
    probs = pred["probs"].astype(np.float32)
    tmp = cell_dir / "test_pred.tmp.npz"
    np.savez(tmp, probs=probs, labels=pred["labels"])
    tmp.replace(cell_dir / "test_pred.npz")
    cell = {"key": key, "best_epoch": res["best_epoch"], "best_val_auroc": res["best_val_auroc"],
            "epochs_run": len(res["history"]), "train_items_per_epoch": len(train_set),
            "seconds": time.time() - t0}
    _atomic_json(done, cell)
    return dict(cell, probs=probs, skipped=False)


# -----------------------------------------------------------------------------------------
# the experiment

def _device(device: str) -> str:
    """"auto" -> cuda if available else cpu; a CUDA device without CUDA is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available (use --device cpu, or "
                         f"--profile cpu)")
    return device


def _open_reference(cfg: AugmentConfig):
    ref = Path(cfg.reference)
    if not ref.is_dir():
        raise FileNotFoundError(f"reference: {ref} is not a folder")
    splits = {}
    for split in ("train", "val", "test"):
        try:
            splits[split] = open_split(ref, split, cfg.size, cfg.uncertain)
        except ValueError as e:
            if "no usable rows" in str(e):
                raise ValueError(f"reference: {ref} has no {split!r} split (rows with split={split}); the augmentation "
                                 f"experiment needs train, val (early stopping) and test (held-out scoring) splits"
                                 ) from None
            raise
    return splits


def run_augment(cfg: AugmentConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """The whole experiment (see the module docstring). Returns what augment.json holds."""
    from tqdm.auto import tqdm

    from megamed.data.loaders import MegamedDataset

    t_start = time.time()
    cfg = replace(cfg, device=_device(cfg.device))
    out = Path(out_dir)
    if cfg.model and not cfg.generated:
        from megamed.generate import resolve_model_dir
        resolve_model_dir(cfg.model)                  # fail before any work if the generator is missing
    if cfg.generated and not (Path(cfg.generated) / "metadata.csv").is_file():
        raise FileNotFoundError(f"generated: {cfg.generated} has no metadata.csv (expected a `megamed generate` "
                                f"output or another data set in megamed's layout)")
    splits = _open_reference(cfg)
    out.mkdir(parents=True, exist_ok=True)
    train, val, test = splits["train"], splits["val"], splits["test"]
    y_train, y_test = _labels(train), _labels(test)
    pos_train = _positives(y_train)
    classes = [c for c in range(len(OBSERVATIONS)) if pos_train[:, c].any()]
    if not classes:
        raise ValueError(f"reference: the train split of {cfg.reference} has no positive label")
    # scored labels: both classes present in the test split (AUROC is defined)
    scored = [c for c in range(len(OBSERVATIONS))
              if (y_test[:, c] == 1).any() and (y_test[:, c] == 0).any()]
    if not scored:
        raise ValueError(f"reference: no label has both positives and negatives in the test split of {cfg.reference}")
    specs = subset_specs(cfg)
    subsets = {(sp["name"], s): choose_subset(y_train, sp, s, classes) for sp in specs for s in cfg.seeds}
    prompt_sets = label_prompt_sets(y_train, classes)
    for sp in specs:
        counts = np.mean([pos_train[subsets[sp["name"], s]].sum(0) for s in cfg.seeds], axis=0)
        sp["subset_positives_mean"] = {OBSERVATIONS[c]: float(counts[c]) for c in classes}
        sp["augment"] = labels_to_augment(counts, classes, cfg.generated_labels)

    # ---- generated images: one pool per prompt (own), or rows of an existing data set
    cache = _ImageCache(cfg.cache_mb << 20)
    gen_parts, gen_info = {}, {}
    if cfg.generated:
        pool_ds = MegamedDataset(cfg.generated, None, cfg.size, uncertain=cfg.uncertain)
        pool_y = _labels(pool_ds)
        gen_info = {"source": str(cfg.generated), "metadata_sha": hashlib.sha256(
            (Path(cfg.generated) / "metadata.csv").read_bytes()).hexdigest()[:16], "n": len(pool_ds)}
        for sp in specs:
            idx, found = external_pool_choice(pool_y, sp["augment"], cfg.generated_per_class)
            gen_parts[sp["name"]] = [(pool_ds, idx)]
            sp["generated_found"] = found
            sp["prompts"] = {}
            for i in idx:
                sp["prompts"][pool_ds.rows[i]["prompt"]] = sp["prompts"].get(pool_ds.rows[i]["prompt"], 0) + 1
    else:
        needed = []
        for sp in specs:
            for c in sp["augment"]:
                if prompt_sets[c] not in needed:
                    needed.append(prompt_sets[c])
        dirs, gen_info = make_pools(cfg, out, needed, train, y_train, progress)
        pools = {ls: MegamedDataset(d, None, cfg.size, uncertain=cfg.uncertain) for ls, d in dirs.items()}
        for sp in specs:
            mine = list(dict.fromkeys(prompt_sets[c] for c in sp["augment"]))   # unique, rarest first
            gen_parts[sp["name"]] = [(pools[ls], range(len(pools[ls]))) for ls in mine]
            sp["prompts"] = {}
            for ls in mine:
                for row in pools[ls].rows:
                    sp["prompts"][row["prompt"]] = sp["prompts"].get(row["prompt"], 0) + 1
    gen_key = _hash(gen_info.get("metadata_sha") or [gen_info.get("model_hash"), gen_info.get("resolution"),
                                                      gen_info.get("sampling"), cfg.gen_seed])

    # ---- the cells
    val_set = _Rows([(val, range(len(val)))], cache)
    test_set = _Rows([(test, range(len(test)))], cache)
    test_paths = _hash([r["image_path"] for r in test.rows])
    base_key = {"reference": str(Path(cfg.reference).resolve()), "size": cfg.size, "uncertain": cfg.uncertain,
                "classifier": asdict(cfg.classifier), "epochs": cfg.epochs, "patience": cfg.patience,
                "batch_size": cfg.batch_size, "lr": cfg.lr, "epoch_items": cfg.epoch_items,
                "balanced": cfg.balanced, "test": test_paths,
                "val": _hash([r["image_path"] for r in val.rows])}
    jobs = [(sp, s, arm) for sp in specs for s in cfg.seeds for arm in ARMS]
    probs: dict = {}
    cells: dict = {}
    bar = tqdm(jobs, desc="augment cells", unit="cell", disable=not progress)
    for sp, s, arm in bar:
        bar.set_postfix_str(f"{sp['name']} seed {s} {arm}")
        real = subsets[sp["name"], s]
        parts = [(train, real)] + (gen_parts[sp["name"]] if arm == "with" else [])
        n_items = sum(len(idx) for _, idx in parts)
        train_set = _Rows(parts, cache, repeat=max(1, math.ceil(cfg.epoch_items / n_items)))
        key = dict(base_key, seed=s, arm=arm,
                   real=_hash([train.rows[i]["image_path"] for i in real]),
                   generated=_hash([[ds.rows[i]["image_path"] for i in idx] for ds, idx in parts[1:]]) + gen_key
                   if arm == "with" else "")
        cell = run_cell(cfg, out / "cells" / sp["name"] / f"seed{s}" / arm, key, train_set, val_set, test_set, s,
                        progress)
        probs[sp["name"], s, arm] = cell.pop("probs")
        cell.update(n_real=len(real), n_generated=n_items - len(real))
        cells[sp["name"], s, arm] = cell
    bar.close()

    result = summarise(cfg, specs, cells, probs, y_test, scored, classes, subsets, pos_train)
    result["counts"] = {"train": len(train), "val": len(val), "test": len(test),
                        "train_positives": {OBSERVATIONS[c]: int(pos_train[:, c].sum()) for c in classes},
                        "test_positives": {OBSERVATIONS[c]: int((y_test[:, c] == 1).sum()) for c in scored}}
    result["generation"] = gen_info
    result["resolution"] = {"classifier": cfg.size, "generated": gen_info.get("resolution"),
                            "reference_source": "resized from the data set's images"}
    result["classifier_parameters"] = sum(p.numel() for p in DenseNetClassifier(cfg.classifier).parameters())
    cell_seconds = sum(c["seconds"] for c in cells.values())
    result["wall_time_s"] = {"this_run": time.time() - t_start, "generation_this_run": gen_info.get("seconds"),
                             "cells_total": cell_seconds,
                             "cells_run_now": sum(1 for c in cells.values() if not c.get("skipped")),
                             "cells_skipped": sum(1 for c in cells.values() if c.get("skipped"))}
    result["config"] = asdict(cfg)
    result["torch_threads"] = torch.get_num_threads()
    _atomic_json(out / "augment.json", result)
    (out / "augment.md").write_text(augment_markdown(result))
    plot_augment(result, out)
    return result


def _ms(values) -> dict:
    v = np.asarray(values, np.float64)
    ok = v[~np.isnan(v)]
    return {"mean": float(ok.mean()) if len(ok) else None,
            "std": float(ok.std(ddof=1)) if len(ok) > 1 else None,          # one seed: no spread to report
            "per_seed": [None if math.isnan(x) else float(x) for x in v]}


def summarise(cfg: AugmentConfig, specs, cells, probs, y_test, scored, classes, subsets, pos_train) -> dict:
    """Per subset and arm: per-label and mean AUROC/F1 (mean ± std over seeds); the paired gain."""
    names = [OBSERVATIONS[c] for c in scored]
    rows = []
    for sp in specs:
        entry = {k: sp[k] for k in ("name", "kind", "value", "title", "subset_positives_mean", "prompts")}
        entry["augmented_labels"] = [OBSERVATIONS[c] for c in sp["augment"]]
        if "generated_found" in sp:
            entry["generated_found"] = sp["generated_found"]
        entry["n_real"] = [int(len(subsets[sp["name"], s])) for s in cfg.seeds]
        entry["n_generated"] = cells[sp["name"], cfg.seeds[0], "with"]["n_generated"]
        for arm in ARMS:
            per = {"auroc": [], "f1": []}
            for s in cfg.seeds:
                p = probs[sp["name"], s, arm]
                per["auroc"].append([auroc(p[:, c], y_test[:, c]) for c in scored])
                per["f1"].append([f1((p[:, c] >= cfg.threshold).astype(float), y_test[:, c]) for c in scored])
            a, f = np.array(per["auroc"]), np.array(per["f1"])          # [S, C]
            entry[arm] = {"mean_auroc": _ms(a.mean(1)), "mean_f1": _ms(f.mean(1)),
                          "auroc": {n: _ms(a[:, j]) for j, n in enumerate(names)},
                          "f1": {n: _ms(f[:, j]) for j, n in enumerate(names)},
                          "best_epoch": [cells[sp["name"], s, arm]["best_epoch"] for s in cfg.seeds],
                          "seconds": sum(cells[sp["name"], s, arm]["seconds"] for s in cfg.seeds)}
        w = np.stack([probs[sp["name"], s, "with"][:, scored] for s in cfg.seeds])
        wo = np.stack([probs[sp["name"], s, "without"][:, scored] for s in cfg.seeds])
        g = paired_gain(w, wo, y_test[:, scored], replicates=cfg.bootstrap, seed=0, threshold=cfg.threshold)
        entry["gain"] = {}
        for metric in ("auroc", "f1"):
            per_seed = np.array(entry["with"][f"mean_{metric}"]["per_seed"], float) - \
                np.array(entry["without"][f"mean_{metric}"]["per_seed"], float)
            entry["gain"][f"mean_{metric}"] = dict(_ms(per_seed), ci=[g[metric]["mean"]["lo"], g[metric]["mean"]["hi"]])
            d = {}
            for j, n in enumerate(names):
                ps = np.array(entry["with"][metric][n]["per_seed"], float) - \
                    np.array(entry["without"][metric][n]["per_seed"], float)
                ci = g[metric]["per_label"]
                d[n] = dict(_ms(ps), ci=[float(ci["lo"][j]), float(ci["hi"][j])])
            entry["gain"][metric] = d
        rows.append(entry)
    return {"labels": names, "seeds": list(cfg.seeds), "subsets": rows,
            "bootstrap": {"replicates": cfg.bootstrap, "level": 0.95, "seed": 0,
                          "method": "paired: each replicate resamples the test images once for both arms and all "
                                    "seeds; the gain is averaged over seeds; percentile interval"},
            "threshold": cfg.threshold, "classes": [OBSERVATIONS[c] for c in classes]}


# -----------------------------------------------------------------------------------------
# reporting

def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(d: dict) -> str:
    return f"{_f(d['mean'])} ± {_f(d['std'])}"


def _gain(d: dict) -> str:
    if d["mean"] is None:
        return "n/a"
    lo, hi = (("n/a" if v is None or v != v else f"{v:+.3f}") for v in d["ci"])
    return f"{d['mean']:+.3f} [{lo}, {hi}]"


def augment_markdown(r: dict) -> str:
    cfg, cnt, wt = r["config"], r["counts"], r["wall_time_s"]
    gen = r["generation"]
    lines = ["# Augmentation experiment", "",
             f"- reference: `{cfg['reference']}` (train {cnt['train']}, val {cnt['val']} for early stopping, "
             f"test {cnt['test']} held out for scoring)",
             f"- generator: `{gen.get('model') or gen.get('source')}`"
             + (f" (hash {gen['model_hash']}, {gen['resolution']}² px, {gen['sampling']['sampler']} "
                f"{gen['sampling']['steps']} steps, guidance {gen['sampling']['guidance']})"
                if "model_hash" in gen else ""),
             f"- resolution: classifier input {cfg['size']}² px (reference and generated images resized to it); "
             f"generated at " + (f"{r['resolution']['generated']}² px" if r['resolution']['generated'] else "their own size"),
             f"- classifier: growth {cfg['classifier']['growth']}, blocks {tuple(cfg['classifier']['blocks'])}, "
             f"{r['classifier_parameters']:,} parameters; up to {cfg['epochs']} epochs of >= {cfg['epoch_items']} "
             f"images, patience {cfg['patience']}, batch {cfg['batch_size']}, lr {cfg['lr']}, "
             f"{'class-balanced' if cfg['balanced'] else 'shuffled'} sampling",
             f"- profile `{cfg['profile']}`, seeds {r['seeds']}, {cfg['generated_per_class']} generated images per "
             f"augmented label; F1 at probability {r['threshold']}",
             f"- wall time: {wt['this_run']:.0f} s this run ({wt['cells_run_now']} cells trained, "
             f"{wt['cells_skipped']} reused; generation {_f(wt['generation_this_run'], 0)} s); all cells together "
             f"{wt['cells_total']:.0f} s of training; torch threads {r['torch_threads']}",
             f"- scored labels ({len(r['labels'])}, both classes in the test split): "
             + ", ".join(f"{n} ({cnt['test_positives'][n]}+)" for n in r["labels"]),
             "",
             "Mean over scored labels; ± is the std over seeds; the gain's [95% CI] is a paired bootstrap over "
             f"test images ({r['bootstrap']['replicates']} replicates).", "",
             "| subset | real images | generated | mean AUROC without | mean AUROC with | AUROC gain [95% CI] "
             "| mean F1 without | mean F1 with | F1 gain [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in r["subsets"]:
        real = sorted(set(s["n_real"]))
        lines.append(f"| {s['title']} | {'-'.join(map(str, real[::max(1, len(real) - 1)]))} | {s['n_generated']} | "
                     f"{_pm(s['without']['mean_auroc'])} | {_pm(s['with']['mean_auroc'])} | "
                     f"{_gain(s['gain']['mean_auroc'])} | {_pm(s['without']['mean_f1'])} | "
                     f"{_pm(s['with']['mean_f1'])} | {_gain(s['gain']['mean_f1'])} |")
    for s in r["subsets"]:
        lines += ["", f"## {s['title']} of the train split", "",
                  "Augmented labels (mean positives in the subset; fewest first): "
                  + ", ".join(f"{n} ({s['subset_positives_mean'][n]:.1f})" for n in s["augmented_labels"]), "",
                  f"Generated images ({s['n_generated']}): " + "; ".join(f"{k} ({v})" for k, v in s["prompts"].items())]
        short = {k: v for k, v in s.get("generated_found", {}).items() if v < cfg["generated_per_class"]}
        if short:
            lines.append("Fewer generated images than asked in the given set for: "
                         + ", ".join(f"{k} ({v})" for k, v in short.items()))
        lines += ["",
                  "| label | AUROC without | AUROC with | gain [95% CI] | F1 without | F1 with | gain [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        for n in r["labels"]:
            lines.append(f"| {n} | {_pm(s['without']['auroc'][n])} | {_pm(s['with']['auroc'][n])} | "
                         f"{_gain(s['gain']['auroc'][n])} | {_pm(s['without']['f1'][n])} | {_pm(s['with']['f1'][n])} | "
                         f"{_gain(s['gain']['f1'][n])} |")
    lines += ["", "Charts: `augment_mean.png` (mean AUROC/F1 per subset), `augment_gain.png` (per-label AUROC gain "
              "with 95% CI).", ""]
    return "\n".join(lines)


def plot_augment(r: dict, out: Path) -> list[Path]:
    """augment_mean.png: mean AUROC and F1 per subset, without vs with (± std over seeds).
    augment_gain.png: per-label AUROC gain with its bootstrap CI, one panel per subset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subs = r["subsets"]
    x = np.arange(len(subs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, metric in zip(axes, ("mean_auroc", "mean_f1")):
        for k, (arm, color) in enumerate((("without", "#999999"), ("with", "#3b7dd8"))):
            m = [s[arm][metric]["mean"] or 0 for s in subs]
            e = [s[arm][metric]["std"] or 0 for s in subs]
            ax.bar(x + (k - 0.5) * 0.38, m, 0.38, yerr=e, capsize=3, color=color, label=f"{arm} generated")
        ax.set_xticks(x, [s["title"] for s in subs])
        ax.set_xlabel("reference training subset")
        ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC").replace("f1", "F1"))
        ax.set_ylim(0, 1)
        if metric == "mean_auroc":
            ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"classifier at {r['config']['size']}², mean ± std over {len(r['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    p1 = out / "augment_mean.png"
    fig.savefig(p1)
    plt.close(fig)

    labels = r["labels"]
    fig, axes = plt.subplots(1, len(subs), figsize=(3.2 * len(subs) + 1.5, 0.32 * len(labels) + 1.6), dpi=100,
                             sharey=True, squeeze=False)
    y = np.arange(len(labels))
    for ax, s in zip(axes[0], subs):
        g = [s["gain"]["auroc"][n] for n in labels]
        m = np.array([d["mean"] if d["mean"] is not None else np.nan for d in g])
        lo = np.array([d["ci"][0] if d["ci"][0] is not None else np.nan for d in g])
        hi = np.array([d["ci"][1] if d["ci"][1] is not None else np.nan for d in g])
        ax.barh(y, np.nan_to_num(m), color=np.where(m >= 0, "#3b7dd8", "#d8663b"))
        ax.errorbar(np.nan_to_num(m), y, xerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], fmt="none",
                    ecolor="k", capsize=2, lw=0.8)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(s["title"], fontsize=9)
        ax.set_xlabel("AUROC gain")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    p2 = out / "augment_gain.png"
    fig.savefig(p2)
    plt.close(fig)
    return [p1, p2]


__all__ = ["AugmentConfig", "PROFILES", "config_for", "run_augment", "choose_subset", "label_prompt_sets",
           "labels_to_augment", "paired_gain", "weighted_auroc", "weighted_f1", "bootstrap_indices",
           "bootstrap_weights", "augment_markdown", "plot_augment"]
