"""megamed.models: the hourglass diffusion transformer, its text encoder, configs, FLOPs, save/load.

    cfg = load_model_config("tiny")                  # shipped: list_configs()
    model = make_model(cfg)                          # MegaMedModel
    ctx = model.encode_text(ids, mask)               # TextContext, once per prompt batch
    out = model(x, c_noise, text_context=ctx)        # raw F(x), [B, C, H, W]
    save_pretrained(model, "out/", tokenizer=tok); model, tok, cfg_dict = from_pretrained("out/")
"""
from __future__ import annotations

from megamed.models.config import (ModelConfig, TextEncoderConfig, config_from_dict, list_configs,  # noqa: F401
                                   load_model_config)
from megamed.models.flops import count_flops, count_params  # noqa: F401
from megamed.models.hdit import MegaMedModel, make_model  # noqa: F401
from megamed.models.io import from_pretrained, save_pretrained  # noqa: F401
from megamed.models.text_encoder import TextContext  # noqa: F401

__all__ = ["ModelConfig", "TextEncoderConfig", "config_from_dict", "list_configs", "load_model_config",
           "MegaMedModel", "make_model", "TextContext", "count_flops", "count_params", "save_pretrained",
           "from_pretrained"]
