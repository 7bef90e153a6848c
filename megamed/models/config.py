"""Model configuration: plain dataclasses <-> strict JSON (unknown keys are an error).

A config says everything needed to rebuild the network (the weights say the rest), so a
checkpoint is `config.json` + `model.safetensors`. Shipped configs live in configs/*.json
and are loaded by name:

    cfg = load_model_config("tiny")          # or a path to a .json file
    model = make_model(cfg)

Per-level lists (widths, depths, d_ffs, attention, cross_attention) run from the highest
resolution (level 0, right after the patch embedding) down to the lowest (the middle of
the hourglass). Level l works on a token grid of (H / patch / 2^l) x (W / patch / 2^l).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megamed.utils.dataclass_json import ConfigError, from_dict, to_dict

CONFIG_DIR = Path(__file__).parent / "configs"

ATTENTION_KINDS = ("neighborhood", "global")
TEXT_KINDS = ("none", "transformer", "hf")


@dataclass
class TextEncoderConfig:
    """Which text encoder turns prompt token ids into per-token states and a pooled vector.

    kind="none"        no text conditioning (unconditional model, e.g. hdit-ffhq-1024)
    kind="transformer" a small pre-norm transformer trained from scratch on our BPE ids
    kind="hf"          a Hugging Face encoder loaded from a LOCAL directory (hf_path),
                       frozen unless hf_trainable, projected to `width`
    """
    kind: str = "transformer"
    width: int = 256            # width of the states handed to the diffusion model
    vocab_size: int = 8192      # transformer only (the HF encoder brings its own)
    max_length: int = 77        # longest token sequence (learned positions)
    depth: int = 2
    d_head: int = 64
    d_ff: int = 768
    dropout: float = 0.0
    hf_path: str = ""           # local directory holding config.json + weights
    hf_trainable: bool = False  # fine-tune the HF encoder (else frozen, run in eval mode)

    def __post_init__(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise ConfigError(f"text.kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.kind == "none":
            return
        _positive(self, "text.", "width", "max_length")
        if self.kind == "transformer":
            _positive(self, "text.", "vocab_size", "depth", "d_head", "d_ff")
            if self.width % self.d_head:
                raise ConfigError(f"text.width ({self.width}) must be a multiple of text.d_head ({self.d_head})")
        if self.kind == "hf" and not self.hf_path:
            raise ConfigError("text.hf_path must name a local Hugging Face model directory when text.kind='hf'")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass
class ModelConfig:
    """The hourglass diffusion transformer (HDiT-style), pixel space."""
    in_channels: int = 1                 # chest X-rays are grayscale
    out_channels: int = 1
    patch_size: int = 4
    default_resolution: int = 1024       # square side the config is meant for (info/flops/sampling default)
    widths: tuple[int, ...] = (128, 256)
    depths: tuple[int, ...] = (2, 2)     # layers per level on the way down (and again on the way up)
    d_ffs: tuple[int, ...] = (384, 768)  # GEGLU hidden width per level
    attention: tuple[str, ...] = ("neighborhood", "global")
    cross_attention: tuple[bool, ...] = (False, True)  # text cross-attention per level
    kernel_size: int = 7                 # neighborhood attention window (odd)
    d_head: int = 64
    attn_kind: str = "cosine"            # "cosine" (HDiT: normalised q/k, learned per-head scale) or "dot"
    rope_fraction: float = 0.5           # fraction of each head's dims rotated by axial RoPE
    mapping_width: int = 256             # conditioning vector width (timestep + pooled text)
    mapping_depth: int = 2
    mapping_d_ff: int = 768
    dropout: float = 0.0
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        # from_dict builds nested dataclasses, but a hand-made config may pass a dict
        if isinstance(self.text, dict):
            self.text = from_dict(TextEncoderConfig, self.text, "text")
        for name in ("widths", "depths", "d_ffs", "attention", "cross_attention"):
            setattr(self, name, tuple(getattr(self, name)))
        _positive(self, "", "in_channels", "out_channels", "patch_size", "default_resolution", "kernel_size",
                  "d_head", "mapping_width", "mapping_depth", "mapping_d_ff")
        n = len(self.widths)
        if n == 0:
            raise ConfigError("widths must name at least one level")
        for name in ("depths", "d_ffs", "attention", "cross_attention"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries but widths has {n}; "
                                  f"give one per level")
        for i, (w, d, f, a) in enumerate(zip(self.widths, self.depths, self.d_ffs, self.attention)):
            if w <= 0 or f <= 0 or d < 0:
                raise ConfigError(f"level {i}: widths/d_ffs must be > 0 and depths >= 0, got {w}/{f}/{d}")
            if w % self.d_head:
                raise ConfigError(f"widths[{i}]={w} must be a multiple of d_head={self.d_head}")
            if a not in ATTENTION_KINDS:
                raise ConfigError(f"attention[{i}] must be one of {ATTENTION_KINDS}, got {a!r}")
        if any(self.cross_attention) and not self.text.enabled:
            raise ConfigError("cross_attention is on at some level but text.kind='none'; "
                              "turn cross_attention off or enable a text encoder")
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.attn_kind not in ("cosine", "dot"):
            raise ConfigError(f"attn_kind must be 'cosine' or 'dot', got {self.attn_kind!r}")
        if self.default_resolution % self.size_multiple:
            raise ConfigError(f"default_resolution={self.default_resolution} must be a multiple of "
                              f"patch_size * 2^(levels-1) = {self.size_multiple}")
        # RoPE rotates pairs of dims per axis, so the rotated part is a multiple of 4
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ConfigError(f"rope_fraction must be in [0, 1], got {self.rope_fraction}")

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (patching, then 2x merges)."""
        return self.patch_size * 2 ** (self.levels - 1)

    @property
    def rope_dims(self) -> int:
        """Dims per head rotated by axial RoPE (multiple of 4: two axes x (cos, sin) pairs)."""
        return int(self.d_head * self.rope_fraction) // 4 * 4

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _positive(cfg, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{prefix}{name} must be a positive integer, got {value!r}")


def config_from_dict(data: dict) -> ModelConfig:
    """Strict: unknown keys raise ConfigError naming the key (e.g. 'text.widht')."""
    return from_dict(ModelConfig, data)


def list_configs() -> list[str]:
    """Names of the shipped configs (configs/*.json)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A shipped config by name ('tiny', 'small', 'base', 'large-1024', 'hdit-ffhq-1024') or a JSON path.

    A JSON file written by save_pretrained ({"model": {...}, "diffusion": ...}) works too.
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"name_or_path: no model config named {str(name_or_path)!r}; "
                             f"shipped configs: {', '.join(list_configs())} (or pass a .json path)")
    elif path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"name_or_path: config file {path} does not exist")
    with open(path) as f:
        data = json.load(f)
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return config_from_dict(data)
