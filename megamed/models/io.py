"""Save / load a MegaMedModel as a self-contained directory:

    DIR/config.json          {"model": <ModelConfig dict>, **extra}  (the trainer adds "diffusion")
    DIR/model.safetensors    every parameter and persistent buffer (fp32, or fp16 with half=True)
    DIR/tokenizer/           tokenizer.save(DIR/tokenizer) when a tokenizer is given
    DIR/text_encoder/        a Hugging Face encoder's config (text.kind='hf'), so loading does
                             not need the original encoder directory

Files are written to temporary names and renamed, so a crash never leaves a half-written
checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megamed.models.config import ModelConfig, config_from_dict
from megamed.models.hdit import MegaMedModel, make_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "text_encoder"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained(model: MegaMedModel, directory: str | Path, *, tokenizer=None, extra: dict | None = None,
                    half: bool = False) -> Path:
    """Write DIR/{model.safetensors, config.json[, tokenizer/]}; returns DIR.

    extra: more top-level keys for config.json (e.g. {"diffusion": {...}}); "model" is reserved.
    half: store floating-point tensors as float16 (half the size; loads back as float32 unless
    from_pretrained is given a dtype).
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original module
    if not isinstance(model, MegaMedModel):
        raise ValueError(f"model: expected a MegaMedModel, got {type(model).__name__}")
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("extra: the key 'model' is reserved for the model config")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach()
        if half and t.is_floating_point():
            t = t.to(torch.float16)
        t = t.to("cpu").contiguous()
        if t.data_ptr() in seen:  # safetensors refuses shared storage (tied weights): store a copy
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "megamed_dtype": "float16" if half else "float32"})
    os.replace(tmp, directory / WEIGHTS_NAME)

    if model.config.text.kind == "hf":
        model.text_encoder.hf.config.save_pretrained(str(directory / HF_CONFIG_DIR))
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    _atomic_write_text(directory / CONFIG_NAME, json.dumps({"model": model.config.to_dict(), **extra}, indent=2) + "\n")
    return directory


def load_config_dict(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a saved megamed model (no {CONFIG_NAME}); see save_pretrained")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'model' key")
    return data


def from_pretrained(directory: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> tuple[MegaMedModel, object | None, dict]:
    """Load what save_pretrained wrote -> (model in eval mode, tokenizer or None, config dict).

    dtype: parameter dtype (default float32, whatever the stored dtype); device: default cpu.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    data = load_config_dict(directory)
    cfg: ModelConfig = config_from_dict(data["model"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = load_file(str(weights), device=str(device))

    if cfg.text.kind == "hf":
        # HF modules carry non-persistent buffers (position ids): build for real, then load
        model = make_model(cfg, device=device, hf_config_dir=directory / HF_CONFIG_DIR)
        model.load_state_dict(state, strict=True)
    else:
        # build on the meta device (no init cost, no memory), then adopt the loaded tensors
        model = make_model(cfg, device="meta")
        model.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{weights}: tensors not in the file: {left[:5]}")
    model.to(device=device, dtype=dtype or torch.float32)
    model.eval()

    tokenizer = None
    if (directory / TOKENIZER_DIR).is_dir():
        from megamed.text.tokenizer import load_tokenizer_dir

        tokenizer = load_tokenizer_dir(directory / TOKENIZER_DIR)
    return model, tokenizer, data


def convert(src: str | Path, dst: str | Path, *, half: bool = True) -> Path:
    """Re-save a saved model (e.g. fp32 training weights -> fp16 for release), keeping config and tokenizer."""
    model, tokenizer, data = from_pretrained(src)
    extra = {k: v for k, v in data.items() if k != "model"}
    return save_pretrained(model, dst, tokenizer=tokenizer, extra=extra, half=half)
