"""Training configuration: one dataclass, and RUN/config.json = {"model", "diffusion", "train"}.

RUN/config.json is written once when a run starts and read back by `--resume`, so a resumed
run trains the same model on the same data with the same hyper-parameters. Flags that only
change how the run is operated (how long, how often to save/sample, device) may differ on
resume; any other flag that disagrees with the stored config is refused with a message.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from megamed.utils.dataclass_json import ConfigError, from_dict, to_dict


@dataclass
class TrainConfig:
    data: str = ""                  # data-set dir: megamed layout (metadata.csv + images/), CheXpert or image folder
    split: str | None = "train"     # metadata split to train on; None = all rows
    size: int = 0                   # training resolution (square); 0 = the model's default_resolution
    max_steps: int = 1000           # total optimizer steps of the run (a resume continues to it)
    batch_size: int = 8             # GLOBAL batch per optimizer step (all processes, all micro-batches together)
    grad_accum_steps: int = 1       # micro-batches per step per process (same result, less activation memory)
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    warmup_steps: int = 100         # linear LR warmup from 0, then constant
    grad_clip: float = 1.0          # max global grad norm; 0 = no clipping
    cond_drop_prob: float = 0.1     # P(text condition dropped) per sample, for classifier-free guidance
    ema_decay: float = 0.9999       # max EMA decay (warmup: 1 - (1 + step)^-ema_power)
    ema_power: float = 0.75
    grad_checkpointing: bool = False
    seed: int = 0
    tokenizer: str = "templates"    # "templates" (built-in prompt vocabulary) or a saved tokenizer dir
    num_workers: int = 0            # DataLoader workers (they only decode images; order is fixed)
    save_every: int = 500           # checkpoint every K steps (and always at the end / on SIGTERM)
    keep_last: int = 3              # keep the newest K checkpoints; 0 = keep all
    sample_every: int = 0           # sample grid every K steps; 0 = never
    sample_steps: int = 20
    sample_guidance: float = 3.0
    log_every: int = 10             # metrics.csv / TensorBoard row every K steps
    tensorboard: bool = True
    device: str = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    deepspeed: bool = False         # DeepSpeed ZeRO (config in RUN/deepspeed.json; megamed.train.zero)

    def __post_init__(self):
        positive = ["max_steps", "batch_size", "grad_accum_steps", "save_every", "sample_steps", "log_every"]
        for name in positive:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ["size", "warmup_steps", "keep_last", "sample_every", "num_workers"]:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.ema_power > 0:
            raise ValueError(f"ema_power must be > 0, got {self.ema_power}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must have two values, got {self.adam_betas!r}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


# Fields that may change between the original run and a resume: they do not change what a
# step computes, only how many steps run and what is written along the way.
RESUMABLE_FIELDS = {"max_steps", "save_every", "keep_last", "sample_every", "sample_steps", "sample_guidance",
                    "log_every", "tensorboard", "device", "num_workers", "grad_checkpointing", "grad_accum_steps"}


def save_run_config(run_dir: str | Path, model_cfg, diffusion_cfg, train_cfg: TrainConfig) -> Path:
    """Write RUN/config.json atomically."""
    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("config.json.tmp")
    data = {"model": to_dict(model_cfg), "diffusion": to_dict(diffusion_cfg), "train": to_dict(train_cfg)}
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_run_config(run_dir: str | Path):
    """(model_cfg, diffusion_cfg, train_cfg) from RUN/config.json (strict: unknown keys raise)."""
    from megamed.diffusion.config import DiffusionConfig
    from megamed.models import ModelConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a megamed training run?")
    data = json.loads(path.read_text())
    missing = [k for k in ("model", "diffusion", "train") if k not in data]
    extra = [k for k in data if k not in ("model", "diffusion", "train")]
    if missing or extra:
        raise ConfigError(f"{path}: expected keys 'model', 'diffusion', 'train'; "
                          f"missing {missing}, unknown {extra}")
    return (from_dict(ModelConfig, data["model"], "model"),
            from_dict(DiffusionConfig, data["diffusion"], "diffusion"),
            from_dict(TrainConfig, data["train"], "train"))


def resume_conflicts(stored: TrainConfig, overrides: dict) -> list[str]:
    """Human-readable list of overrides that would change a resumed run's computation."""
    out = []
    for key, value in overrides.items():
        if key in RESUMABLE_FIELDS:
            continue
        old = getattr(stored, key)
        if isinstance(old, tuple):
            value = tuple(value)
        if value != old:
            out.append(f"{key}: run has {old!r}, flag asks for {value!r}")
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of cfg with the given fields replaced (re-validated)."""
    unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(TrainConfig)}]
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}")
    return dataclasses.replace(cfg, **overrides)
