"""Training checkpoints: RUN/checkpoints/step-N/, written atomically, keep-last-K.

    step-N/model.safetensors   training weights
    step-N/ema.safetensors     EMA weights (what gets exported / sampled)
    step-N/optimizer.pt        AdamW state + LR scheduler state
    step-N/state.pt            step, data position (epoch, offset), RNG states
    step-N/state.json          the same scalars, for people

A DeepSpeed run (megamed.train.zero) writes the same state.pt/state.json/ema.safetensors, and
DeepSpeed's own files (mp_rank_*/zero_pp_rank_* model and optimizer partitions) instead of
model.safetensors and optimizer.pt.

A checkpoint is built in step-N.tmp/ and renamed into place, so a kill mid-write leaves the
previous checkpoints intact and never a half-written step-N/. Leftover *.tmp dirs are ignored
by `latest_checkpoint` and removed by the next save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Make a fresh RUN/checkpoints/step-{step}.tmp/ (removing leftovers of killed saves) and return it."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):  # from a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"step-{step}.tmp"
    tmp.mkdir()
    return tmp


def write_state(tmp: Path, step: int, state: dict) -> None:
    """tmp/state.pt (everything, pickled) and tmp/state.json (its scalars, for people)."""
    torch.save(dict(state, step=step), tmp / "state.pt")
    scalars = {k: v for k, v in dict(state, step=step).items() if isinstance(v, (int, float, str, bool))}
    (tmp / "state.json").write_text(json.dumps(scalars, indent=2) + "\n")


def commit_checkpoint(run_dir: str | Path, tmp: Path, step: int, keep_last: int = 0) -> Path:
    """fsync everything in tmp (recursively), rename it to step-{step}, prune to the newest keep_last."""
    root = checkpoint_dir(run_dir)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = root / f"step-{step}"
    if final.exists():  # same step saved again (e.g. interrupted right after a resume): swap
        old = root / f"step-{step}.old.tmp"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    if keep_last > 0:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, ema_model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: dict, keep_last: int = 0) -> Path:
    """Write RUN/checkpoints/step-{step}/ atomically, then prune to the newest `keep_last` (0 = all).

    state: small picklable dict (step, epoch, offset, rng states, ...); its scalars also go to
    state.json.
    """
    from safetensors.torch import save_model

    tmp = begin_checkpoint(run_dir, step)
    # save_model (not save_file) handles tied/shared weights.
    save_model(model, str(tmp / "model.safetensors"))
    save_model(ema_model, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    write_state(tmp, step, state)
    return commit_checkpoint(run_dir, tmp, step, keep_last)


def load_checkpoint(path: str | Path, *, model: nn.Module, ema_model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, device: torch.device | str = "cpu") -> dict:
    """Restore everything save_checkpoint wrote into the given objects; returns the state dict."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.pt)")
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    load_model(ema_model, str(path / "ema.safetensors"), strict=True, device=str(device))
    opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
