"""Training metrics: RUN/logs/metrics.csv (always) and TensorBoard event files (if installed).

metrics.csv is the source of truth (tests and scripts read it); TensorBoard is for people.
On resume, rows after the checkpoint's step are dropped first: they belong to steps that will
be run again, and keeping them would duplicate steps in the curve.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["step", "loss", "lr", "grad_norm", "images_per_s", "epoch", "wall_s"]


def _parse(key: str, text: str | None):
    if text is None or text == "":
        return None  # a metric that was not logged on that row
    return int(text) if key in ("step", "epoch") else float(text)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of RUN/logs/metrics.csv with numbers parsed; missing cells are None ([] if no file)."""
    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


class MetricsLogger:
    """Appends one row per logged step; mirrors scalars to TensorBoard when available."""

    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(run_dir) / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.csv"
        self._truncate_after(resume_step)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=METRIC_COLUMNS)
        if new:
            self._csv.writeheader()
        self._gpu_csv = self._gpu_file = None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
            except ImportError:
                log.info("tensorboard is not installed; logging to metrics.csv only "
                         "(pip install 'megamed[logging]' for TensorBoard event files)")
            else:
                # purge_step drops events after the resume step, like _truncate_after does for the CSV.
                self._tb = SummaryWriter(str(self.dir), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        rows = read_metrics(self.path.parent.parent)
        if rows and any(r["step"] > step for r in rows):
            tmp = self.path.with_name("metrics.csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                w.writeheader()
                w.writerows(r for r in rows if r["step"] <= step)
            os.replace(tmp, self.path)

    def log(self, step: int, **metrics: float) -> None:
        unknown = set(metrics) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {METRIC_COLUMNS}")
        self._csv.writerow({"step": step, **metrics})
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if k not in ("epoch", "wall_s"):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def log_gpu(self, step: int, row: dict) -> None:
        """GPU telemetry (megamed.train.telemetry.as_row: gpu0_mem_used_mib, ...) -> logs/gpu.csv,
        whose columns are fixed by its first row, and TensorBoard scalars under gpu/."""
        if self._gpu_csv is None:
            path = self.dir / "gpu.csv"
            new = not path.is_file()
            self._gpu_file = open(path, "a", newline="")
            self._gpu_csv = csv.DictWriter(self._gpu_file, fieldnames=["step", *row], extrasaction="ignore")
            if new:
                self._gpu_csv.writeheader()
        self._gpu_csv.writerow({"step": step, **row})
        self._gpu_file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if v is not None:
                    self._tb.add_scalar(f"gpu/{k}", v, step)

    def add_image(self, tag: str, image_chw01, step: int) -> None:
        """image_chw01: float tensor [C, H, W] in [0, 1]."""
        if self._tb is not None:
            self._tb.add_image(tag, image_chw01, step)

    def close(self) -> None:
        self._file.close()
        if self._gpu_file is not None:
            self._gpu_file.close()
        if self._tb is not None:
            self._tb.close()
