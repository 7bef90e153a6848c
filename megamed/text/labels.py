"""CheXpert label rows: loading, statistics, and a sampler of realistic finding combinations.

Source: `chexpert_train.csv.gz` from the torchxrayvision 1.5.7 wheel (fetched into the cache by
`megamed.data.fetch`). It is CheXpert's own train.csv (same columns as `layout.CHEXPERT_COLUMNS`,
Path prefixed "CheXpert-v1.0-small/"), labels only, no images. CheXpert labels are under
Stanford's research-use terms: statistics are computed at run time; nothing derived is shipped.

Why a sampler: generation/evaluation prompt sets should look like real studies (effusion
and cardiomegaly co-occur; "pneumothorax + fracture + nothing else" is rare), so we sample
whole positive-label *sets* from their empirical joint distribution, not labels independently.
"""
from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megamed.data.layout import CHEXPERT_COLUMNS, OBSERVATIONS
from megamed.text.prompts import FINDINGS, label_value

N_CHEXPERT_ROWS = 223414


def load_chexpert_labels(path: str | Path | None = None, *, progress: bool = True) -> list[dict]:
    """Rows of CheXpert's train.csv: metadata columns as str, the 14 labels as 1.0/0.0/-1.0/None.

    `path` defaults to the cached chexpert_train.csv.gz. A file whose header is not CheXpert's
    columns is a ValueError naming the difference (the loader relies on exact names).
    """
    if path is None:
        from megamed.data.fetch import TORCHXRAYVISION, fetch
        path = fetch(TORCHXRAYVISION)["chexpert_train.csv.gz"]
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CHEXPERT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a CheXpert label file, missing column(s) {missing}")
        for i, row in enumerate(tqdm(reader, desc="CheXpert labels", unit="row", disable=not progress,
                                     leave=False, mininterval=1.0)):
            try:
                for name in OBSERVATIONS:
                    row[name] = label_value(name, row[name])
            except ValueError as e:
                raise ValueError(f"{path}: row {i + 2}: {e}") from None  # +2: header line, 1-based
            rows.append(row)
    return rows


def _is_frontal(row: dict) -> bool:
    return str(row.get("Frontal/Lateral", "Frontal")).strip().lower() == "frontal"


def positive_set(row: dict) -> tuple[str, ...]:
    """The row's positive findings (value 1.0) in CheXpert column order; () means normal."""
    return tuple(n for n in FINDINGS if label_value(n, row.get(n)) == 1.0)


def label_statistics(rows: list[dict]) -> dict:
    """Per-label counts and co-occurrence over `rows` (label cells may be floats or CSV text).

    Returns {"n": N,
             "count":       {label: {"positive", "negative", "uncertain", "blank": int}},
             "prevalence":  {label: positives / N},
             "cooccurrence": {a: {b: #rows with both a and b positive}} (diagonal = positives),
             "combinations": number of distinct positive-label sets}
    """
    if not rows:
        raise ValueError("rows: empty; need at least one label row")
    keys = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "blank"}
    count = {n: dict.fromkeys(keys.values(), 0) for n in OBSERVATIONS}
    co = np.zeros((len(OBSERVATIONS), len(OBSERVATIONS)), dtype=np.int64)  # [14, 14]
    sets = Counter()
    for i, row in enumerate(rows):
        pos = np.zeros(len(OBSERVATIONS), dtype=bool)                       # [14]
        for j, name in enumerate(OBSERVATIONS):
            try:
                v = label_value(name, row.get(name))
            except ValueError as e:
                raise ValueError(f"rows[{i}]: {e}") from None
            count[name][keys[v]] += 1
            pos[j] = v == 1.0
        co += pos[:, None] & pos[None, :]
        sets[positive_set(row)] += 1
    n = len(rows)
    return {
        "n": n,
        "count": count,
        "prevalence": {name: count[name]["positive"] / n for name in OBSERVATIONS},
        "cooccurrence": {a: {b: int(co[i, j]) for j, b in enumerate(OBSERVATIONS)} for i, a in enumerate(OBSERVATIONS)},
        "combinations": len(sets),
    }


class LabelSampler:
    """Samples positive-label sets from an empirical joint distribution.

    combos: distinct positive sets (tuples of finding names, () = normal); counts: how often each
    was seen. Samples come back as label dicts {observation: 1.0 | 0.0} over all 14 observations,
    ready for `prompt_from_labels`.
    """

    def __init__(self, combos: list[tuple[str, ...]], counts: list[int]):
        if len(combos) != len(counts) or not combos:
            raise ValueError(f"combos/counts: need equal, non-empty lengths (got {len(combos)}, {len(counts)})")
        for c in combos:
            bad = [n for n in c if n not in FINDINGS]
            if bad:
                raise ValueError(f"combos: unknown finding {bad[0]!r}")
        counts = np.asarray(counts, dtype=np.float64)
        if (counts <= 0).any():
            raise ValueError("counts: every combination needs a positive count")
        # canonical order (most frequent first, ties by name) so equal data -> identical sampler
        order = sorted(range(len(combos)), key=lambda i: (-counts[i], combos[i]))
        self.combos = [tuple(n for n in FINDINGS if n in combos[i]) for i in order]
        self.counts = counts[order]
        self.probabilities = self.counts / self.counts.sum()

    @classmethod
    def from_rows(cls, rows: list[dict], *, frontal_only: bool = True, min_count: int = 1) -> "LabelSampler":
        """Empirical distribution of positive sets among `rows` (frontal images only by default;
        combinations seen fewer than `min_count` times are dropped)."""
        sets = Counter(positive_set(r) for r in rows if not frontal_only or _is_frontal(r))
        kept = [(c, k) for c, k in sets.items() if k >= min_count]
        if not kept:
            raise ValueError(f"rows: no {'frontal ' if frontal_only else ''}rows with a combination seen "
                             f">= {min_count} times")
        return cls([c for c, _ in kept], [k for _, k in kept])

    @classmethod
    def from_chexpert(cls, *, frontal_only: bool = True, min_count: int = 1) -> "LabelSampler":
        """From CheXpert's 223k training label rows (cached file; ~2 s to parse)."""
        return cls.from_rows(load_chexpert_labels(), frontal_only=frontal_only, min_count=min_count)

    def __len__(self) -> int:
        return len(self.combos)

    @staticmethod
    def _rng(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
        if seed is not None and generator is not None:
            raise ValueError("seed/generator: give one, not both")
        return generator if generator is not None else np.random.default_rng(seed)

    def _draw(self, n: int, probs: np.ndarray, idx: np.ndarray, rng) -> list[dict[str, float]]:
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        picks = rng.choice(idx, size=n, p=probs / probs.sum())
        return [{name: float(name in self.combos[i]) if name != "No Finding" else float(not self.combos[i])
                 for name in OBSERVATIONS} for i in picks]

    def sample(self, n: int, *, seed: int | None = None, generator: np.random.Generator | None = None,
               temperature: float = 1.0) -> list[dict[str, float]]:
        """n label dicts. temperature < 1 flattens the distribution (rarer combinations more often;
        0 = uniform over combinations), 1 = empirical."""
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        probs = self.probabilities ** temperature
        return self._draw(n, probs, np.arange(len(self.combos)), self._rng(seed, generator))

    def sample_with(self, finding: str, n: int, *, seed: int | None = None,
                    generator: np.random.Generator | None = None) -> list[dict[str, float]]:
        """n label dicts that all contain `finding` ("No Finding" = normal studies), with the
        other findings drawn from their empirical co-occurrence."""
        if finding not in OBSERVATIONS:
            raise ValueError(f"finding: unknown observation {finding!r}")
        idx = np.array([i for i, c in enumerate(self.combos) if (not c if finding == "No Finding" else finding in c)])
        if len(idx) == 0:
            raise ValueError(f"finding: {finding!r} never occurs in this sampler's data")
        return self._draw(n, self.probabilities[idx], idx, self._rng(seed, generator))

    def balanced(self, n_per_finding: int, *, seed: int | None = None,
                 generator: np.random.Generator | None = None) -> list[dict[str, float]]:
        """`n_per_finding` label dicts for each of the 14 observations that occur (normal included),
        in CheXpert order: a prompt set where rare findings are as common as frequent ones."""
        rng = self._rng(seed, generator)
        out = []
        for name in OBSERVATIONS:
            if name == "No Finding" and () not in self.combos:
                continue
            if name != "No Finding" and not any(name in c for c in self.combos):
                continue
            out += self.sample_with(name, n_per_finding, generator=rng)
        return out
