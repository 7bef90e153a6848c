"""Text encoders: prompt token ids [B, L] + mask [B, L] -> TextContext(states, mask, pooled).

Two kinds (TextEncoderConfig.kind):
- "transformer": a small pre-norm transformer over our BPE ids (megamed.text.tokenizer),
  learned positions, trained from scratch with the diffusion model.
- "hf": a Hugging Face encoder (e.g. a BERT) loaded from a LOCAL directory through
  `transformers`, frozen (eval mode, no grad) unless hf_trainable, then projected to
  `width`. Nothing is downloaded.

Both pool the same way: pooled = masked mean of the output states over real tokens. A row
whose mask is all False (the unconditional / dropped prompt) therefore pools to exactly
zero, whatever its ids, and the diffusion model's cross-attention ignores it entirely.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megamed import ops
from megamed.models.config import TextEncoderConfig
from megamed.models.layers import LinearGEGLU, RMSNorm, zero_init


@dataclass
class TextContext:
    """Encoded prompts, computed once per prompt batch and reused at every sampling step.

    states [B, L, D] per-token states, mask [B, L] bool (True = real token), pooled [B, D].
    """
    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def from_states(cls, states: torch.Tensor, mask: torch.Tensor | None = None) -> "TextContext":
        """Build from states [B, L, D] (+ mask [B, L]; None = all real); pooled = masked mean."""
        if states.dim() != 3:
            raise ValueError(f"text_context: expected states [B, L, D], got shape {tuple(states.shape)}")
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if mask.dtype != torch.bool or mask.shape != states.shape[:2]:
            raise ValueError(f"text_mask: expected a bool tensor of shape {tuple(states.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return cls(states, mask, masked_mean(states, mask))

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    def expand(self, batch: int) -> "TextContext":
        """Broadcast a batch-1 context (one prompt) to `batch` images."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"text_context: batch {self.batch_size} does not match the image batch {batch}")
        return TextContext(self.states.expand(batch, -1, -1), self.mask.expand(batch, -1),
                           self.pooled.expand(batch, -1))

    def unconditional(self) -> "TextContext":
        """The same shapes with every token masked out: what classifier-free guidance needs."""
        return TextContext(torch.zeros_like(self.states), torch.zeros_like(self.mask), torch.zeros_like(self.pooled))


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """states [B, L, D], mask [B, L] -> [B, D]; a row with no real token gives exactly 0."""
    total = torch.where(mask[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device)).sum(1)
    count = mask.sum(1, keepdim=True).clamp(min=1).to(states.dtype)
    return total / count


def check_text_inputs(text_ids: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ids [B, L] (integer) and mask [B, L] (bool); returns the mask (all True if None)."""
    if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or text_ids.is_floating_point():
        got = f"{getattr(text_ids, 'dtype', type(text_ids).__name__)} {tuple(getattr(text_ids, 'shape', ()))}"
        raise ValueError(f"text_ids: expected an integer tensor [B, L], got {got}")
    if text_mask is None:
        return torch.ones_like(text_ids, dtype=torch.bool)
    if not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool or text_mask.shape != text_ids.shape:
        raise ValueError(f"text_mask: expected a bool tensor of shape {tuple(text_ids.shape)} (like text_ids), got "
                         f"{getattr(text_mask, 'dtype', type(text_mask).__name__)} "
                         f"{tuple(getattr(text_mask, 'shape', ()))}")
    return text_mask


# ---------------------------------------------------------------------------------------------
# the small transformer
# ---------------------------------------------------------------------------------------------

class TextBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)), then x + GEGLU-MLP(norm(x)). x [B, L, D]."""

    def __init__(self, width: int, d_head: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.d_head, self.n_heads = d_head, width // d_head
        self.attn_norm = RMSNorm(width)
        self.qkv_proj = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = zero_init(nn.Linear(width, width, bias=False))
        self.ff_norm = RMSNorm(width)
        self.up_proj = LinearGEGLU(width, d_ff, bias=False)
        self.down_proj = zero_init(nn.Linear(d_ff, width, bias=False))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv_proj(self.attn_norm(x)).view(B, L, 3, self.n_heads, self.d_head)
        # bidirectional attention over real tokens only; all-padding rows come back as zeros
        y = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_padding_mask=mask)  # [B, L, heads, d]
        x = x + self.out_proj(self.dropout(y.reshape(B, L, D)))
        return x + self.down_proj(self.dropout(self.up_proj(self.ff_norm(x))))


class TransformerTextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.02)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([TextBlock(cfg.width, cfg.d_head, cfg.d_ff, cfg.dropout)
                                     for _ in range(cfg.depth)])
        self.out_norm = RMSNorm(cfg.width)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        mask = check_text_inputs(text_ids, text_mask)
        B, L = text_ids.shape
        if L > self.cfg.max_length:
            raise ValueError(f"text_ids: length {L} exceeds the text encoder's max_length {self.cfg.max_length}")
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"text_ids: ids must lie in [0, vocab_size={self.cfg.vocab_size}), got range "
                             f"[{int(text_ids.min())}, {int(text_ids.max())}]; is the tokenizer's vocabulary "
                             f"larger than the model config's text.vocab_size?")
        x = self.token_emb(text_ids) + self.pos_emb[:L]                 # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        return TextContext.from_states(self.out_norm(x), mask)


# ---------------------------------------------------------------------------------------------
# a local Hugging Face encoder
# ---------------------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("text.kind='hf' needs the `transformers` package: pip install 'megamed[hf]' "
                          "(or pip install transformers)") from e
    return transformers


class HFTextEncoder(nn.Module):
    """AutoModel from a local directory -> last_hidden_state -> Linear to width -> RMSNorm.

    hf_config_dir: build the architecture from a saved config only (random weights; the
    caller loads a full megamed state dict next). from_pretrained uses this so a saved model
    does not need the original encoder directory.
    """

    def __init__(self, cfg: TextEncoderConfig, *, hf_config_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        tf = _transformers()
        if hf_config_dir is not None:
            hf_config = tf.AutoConfig.from_pretrained(str(hf_config_dir), local_files_only=True)
            self.hf = tf.AutoModel.from_config(hf_config)
        else:
            path = Path(cfg.hf_path).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"text.hf_path: {path} is not a local Hugging Face model directory "
                                 f"(no config.json); nothing is downloaded, save the model there first")
            self.hf = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
        hidden = self.hf.config.hidden_size
        self.max_positions = getattr(self.hf.config, "max_position_embeddings", None)
        self.proj = nn.Linear(hidden, cfg.width, bias=False)
        self.out_norm = RMSNorm(cfg.width)
        self.trainable = cfg.hf_trainable
        if not self.trainable:
            self.hf.requires_grad_(False)
            self.hf.eval()

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        if not self.trainable:
            self.hf.eval()  # a frozen encoder never runs dropout
        return self

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        mask = check_text_inputs(text_ids, text_mask)
        if self.max_positions is not None and text_ids.shape[1] > self.max_positions:
            raise ValueError(f"text_ids: length {text_ids.shape[1]} exceeds the HF encoder's "
                             f"max_position_embeddings {self.max_positions}")
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.hf(input_ids=text_ids, attention_mask=mask.long()).last_hidden_state  # [B, L, hidden]
        states = self.out_norm(self.proj(hidden.to(self.proj.weight.dtype)))                  # [B, L, width]
        return TextContext.from_states(states, mask)


def make_text_encoder(cfg: TextEncoderConfig, *, hf_config_dir: str | Path | None = None) -> nn.Module | None:
    if cfg.kind == "none":
        return None
    if cfg.kind == "transformer":
        return TransformerTextEncoder(cfg)
    return HFTextEncoder(cfg, hf_config_dir=hf_config_dir)
