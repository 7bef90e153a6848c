"""MegaMedModel: an hourglass diffusion transformer in pixel space, conditioned on text.

After HDiT (Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image Synthesis with
Hourglass Diffusion Transformers"; k-diffusion image_transformer_v2), plus text:

    x [B, C, H, W] --patch embed (p x p -> width[0])--> tokens [B, H/p, W/p, width[0]]
    down:  level 0 layers -> merge 2x2 -> level 1 layers -> ... -> merge
    mid:   level L-1 layers (lowest resolution)
    up:    split 2x2, lerp into the skip -> level l layers (own weights) -> ... -> level 0
    out:   RMSNorm -> unpatch linear (zero-init) -> [B, C_out, H, W]

High-resolution levels use neighborhood attention (cost linear in tokens), low-resolution
levels global self-attention; `cross_attention` levels also attend to the text states.
Every layer reads `cond` [B, mapping_width] through AdaRMSNorm; cond comes from the
mapping network applied to Fourier features of c_noise plus the projected pooled text.

The network returns the raw F(x); EDM preconditioning (c_skip, c_out, c_in, c_noise) lives
in megamed.diffusion.Denoiser. At init every transformer block is the identity and the
unpatch layer is zero, so F(x) == 0 exactly at init.
"""
from __future__ import annotations

import torch
from torch import nn

from megamed import ops
from megamed.models.config import ModelConfig
from megamed.models.layers import (FourierFeatures, Level, MappingNetwork, RMSNorm, TokenMerge, TokenSplit,
                                   TransformerLayer, make_axial_pos, rope_freqs, rope_theta, zero_init)
from megamed.models.text_encoder import TextContext, make_text_encoder


class MegaMedModel(nn.Module):
    def __init__(self, config: ModelConfig, *, hf_config_dir=None):
        super().__init__()
        self.config = cfg = config
        p = cfg.patch_size
        text_width = cfg.text.width if cfg.text.enabled else None

        # text: per-token states for cross-attention, pooled vector for the mapping network
        self.text_encoder = make_text_encoder(cfg.text, hf_config_dir=hf_config_dir)

        # patch embedding: a linear on non-overlapping p x p patches (row, col, channel order)
        self.patch_in = TokenMerge(cfg.in_channels, cfg.widths[0], factor=p)

        # conditioning: c_noise -> Fourier features -> linear; + pooled text; -> mapping MLP
        self.time_emb = FourierFeatures(cfg.mapping_width)
        self.time_in_proj = nn.Linear(cfg.mapping_width, cfg.mapping_width, bias=False)
        # no bias: an all-masked prompt pools to 0 and must add exactly 0 here
        self.text_pool_proj = nn.Linear(text_width, cfg.mapping_width, bias=False) if text_width else None
        self.mapping = MappingNetwork(cfg.mapping_depth, cfg.mapping_width, cfg.mapping_d_ff, cfg.dropout)

        def make_level(i: int) -> Level:
            context = text_width if cfg.cross_attention[i] else None
            return Level([TransformerLayer(cfg.widths[i], cfg.d_ffs[i], cfg.d_head, cfg.mapping_width,
                                           kind=cfg.attention[i], kernel_size=cfg.kernel_size,
                                           attn_kind=cfg.attn_kind, context_features=context, dropout=cfg.dropout)
                          for _ in range(cfg.depths[i])])

        last = cfg.levels - 1
        self.down_levels = nn.ModuleList([make_level(i) for i in range(last)])
        self.mid_level = make_level(last)
        self.up_levels = nn.ModuleList([make_level(i) for i in range(last)])
        self.merges = nn.ModuleList([TokenMerge(cfg.widths[i], cfg.widths[i + 1]) for i in range(last)])
        self.splits = nn.ModuleList([TokenSplit(cfg.widths[i + 1], cfg.widths[i]) for i in range(last)])

        self.out_norm = RMSNorm(cfg.widths[0])
        # unpatch: width[0] -> p*p*C_out per token, zero-init so F(x) starts at exactly 0
        self.patch_out = zero_init(nn.Linear(cfg.widths[0], p * p * cfg.out_channels, bias=False))

    # -----------------------------------------------------------------------------------------
    # public API
    # -----------------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer layer in backward (torch.utils.checkpoint, non-reentrant)."""
        for level in self.levels():
            level.gradient_checkpointing = bool(enabled)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matrices of linear layers only. Norm scales (init 1), the
        cosine-attention scales (init 10), lerp factors and embeddings are not pulled to zero.
        Frozen parameters (a frozen HF text encoder) are left out."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            embedding = name.endswith(("token_emb.weight", "pos_emb"))
            (decay if p.dim() >= 2 and not embedding else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def levels(self) -> list[Level]:
        return [*self.down_levels, self.mid_level, *self.up_levels]

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        """ids [B, L] + mask [B, L] -> TextContext(states [B, L, D], mask, pooled [B, D]).

        Samplers call this once and pass text_context= at every step.
        """
        if self.text_encoder is None:
            raise ValueError("text_ids: this model has no text encoder (config text.kind='none')")
        return self.text_encoder(text_ids, text_mask)

    def check_size(self, height: int, width: int) -> None:
        """ValueError naming height/width unless the model can run at height x width."""
        m, cfg = self.config.size_multiple, self.config
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % m:
                raise ValueError(f"{name}={size} must be a positive multiple of patch_size * 2^(levels-1) = "
                                 f"{cfg.patch_size} * 2^{cfg.levels - 1} = {m}")
        # neighborhood attention needs at least kernel_size tokens per side on its levels
        for i, kind in enumerate(cfg.attention):
            if kind != "neighborhood" or cfg.depths[i] == 0:
                continue
            tokens = cfg.patch_size * 2 ** i
            need = -(-cfg.kernel_size * tokens // m) * m  # smallest multiple of m with >= kernel_size tokens
            for name, size in (("height", height), ("width", width)):
                if size // tokens < cfg.kernel_size:
                    raise ValueError(f"{name}={size} is too small: level {i} would have {size // tokens} tokens, "
                                     f"fewer than kernel_size={cfg.kernel_size}; use {name} >= {need}")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, *, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None,
                text_context: TextContext | torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], c_noise [B] -> F(x) [B, C_out, H, W].

        Text, at most one of:
          text_ids [B, L] (+ text_mask [B, L]; None = all real): encoded here;
          text_context: a TextContext from encode_text, or its states [B, L, D] with text_mask.
          A batch of 1 prompt is broadcast to all B images.
        Neither = unconditional, identical to passing a text_mask that is all False.
        """
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected [B, {cfg.in_channels}, H, W], got {tuple(getattr(x, 'shape', ()))}")
        B, _, H, W = x.shape
        self.check_size(H, W)
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.dim() == 0:
            c_noise = c_noise.expand(B)
        if c_noise.shape != (B,):
            raise ValueError(f"c_noise: expected shape [B] = [{B}], got {tuple(c_noise.shape)}")
        context = self._text_context(B, text_ids, text_mask, text_context)

        # conditioning vector [B, mapping_width]
        emb = self.time_in_proj(self.time_emb(c_noise.float()).to(self.time_in_proj.weight.dtype))
        if context is not None:
            emb = emb + self.text_pool_proj(context.pooled.to(emb.dtype))
        cond = self.mapping(emb)
        states = mask = None
        if context is not None:
            states, mask = context.states.to(x.dtype), context.mask

        # patch embedding: [B, C, H, W] -> channels-last tokens [B, H/p, W/p, width0]
        h = self.patch_in(x.movedim(1, -1))

        # hourglass; RoPE angles once per level (shared by its down and up layers)
        thetas = [self._theta(i, H, W, x.device) for i in range(cfg.levels)]
        skips = []
        for i, (level, merge) in enumerate(zip(self.down_levels, self.merges)):
            h = level(h, thetas[i], cond, states, mask)
            skips.append(h)
            h = merge(h)
        h = self.mid_level(h, thetas[-1], cond, states, mask)
        for i in reversed(range(cfg.levels - 1)):
            h = self.splits[i](h, skips[i])
            h = self.up_levels[i](h, thetas[i], cond, states, mask)

        # unpatch: linear to p*p*C_out per token, pixel-shuffled back -> [B, C_out, H, W]
        h = self.out_norm(h)
        out = ops.patch_split(h, self.patch_out.weight.to(h.dtype), factor=cfg.patch_size)   # [B, H, W, C_out]
        return out.movedim(-1, 1)

    # -----------------------------------------------------------------------------------------
    # helpers
    # -----------------------------------------------------------------------------------------

    def _theta(self, level: int, height: int, width: int, device) -> torch.Tensor:
        """RoPE angles [H_l, W_l, heads, rope_dims/2] for the token grid of `level` at height x width."""
        cfg = self.config
        step = cfg.patch_size * 2 ** level                                           # pixels per token
        pos = make_axial_pos(height // step, width // step, device=device)           # [H_l, W_l, 2]
        freqs = rope_freqs(cfg.rope_dims, cfg.widths[level] // cfg.d_head, device=device)
        return rope_theta(pos, freqs)

    def _text_context(self, batch: int, text_ids, text_mask, text_context) -> TextContext | None:
        if text_ids is not None and text_context is not None:
            raise ValueError("text_ids and text_context: pass one or the other, not both")
        if text_ids is not None:
            if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or text_ids.shape[0] not in (1, batch):
                raise ValueError(f"text_ids: expected [B, L] with B = {batch} (or 1: one prompt for every image), "
                                 f"got {tuple(getattr(text_ids, 'shape', ()))}")
            context = self.encode_text(text_ids, text_mask).expand(batch)
        elif text_context is not None:
            if self.text_encoder is None:
                raise ValueError("text_context: this model has no text encoder (config text.kind='none')")
            if isinstance(text_context, torch.Tensor):  # states [B, L, D] + text_mask
                text_context = TextContext.from_states(text_context, text_mask)
            elif text_mask is not None:
                raise ValueError("text_mask: give the mask inside the TextContext, not separately")
            if text_context.states.shape[-1] != self.config.text.width:
                raise ValueError(f"text_context: states width {text_context.states.shape[-1]} != "
                                 f"text.width {self.config.text.width}")
            context = text_context.expand(batch)
        else:
            if text_mask is not None:
                raise ValueError("text_mask: given without text_ids or text_context")
            return None
        return context


def make_model(cfg: ModelConfig, *, device=None, dtype=None, hf_config_dir=None) -> MegaMedModel:
    """Build a MegaMedModel from a ModelConfig. device='meta' builds without allocating memory
    (parameter counts, FLOPs); the caller must load weights before running it."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: expected a ModelConfig, got {type(cfg).__name__} (see load_model_config)")
    if device is not None:
        with torch.device(device):
            model = MegaMedModel(cfg, hf_config_dir=hf_config_dir)
    else:
        model = MegaMedModel(cfg, hf_config_dir=hf_config_dir)
    if dtype is not None:
        model.to(dtype)
    return model
