"""CLIP-style contrastive image-text alignment for chest X-rays (Radford et al. 2021).

Used to judge generated images: `score(images, prompts)` is the cosine similarity between an
image and its prompt in a shared embedding space (a metric, and a reward for RL fine-tuning).

    image [B, 1, H, W] in [-1, 1] -> resize to image_size -> conv encoder -> Linear -> L2 norm -> [B, E]
    prompt ids [B, L], mask [B, L] -> TransformerTextEncoder -> masked mean -> Linear -> L2 norm -> [B, E]
    logits [B, B] = exp(logit_scale) * image_emb @ text_emb.T, trained with symmetric InfoNCE

The text tower is megamed.models.text_encoder's TransformerTextEncoder (same code as the
diffusion model's, separate weights). A saved model is a directory:

    DIR/config.json        {"align": <AlignConfig dict>}
    DIR/model.safetensors  all parameters (fp32)
    DIR/tokenizer/         the prompt tokenizer (tokenizer.json)
    DIR/metrics.json       what `train_align` measured (loss, retrieval accuracy)
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megamed.models.config import TextEncoderConfig
from megamed.models.text_encoder import TransformerTextEncoder
from megamed.utils.dataclass_json import from_dict, to_dict

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
METRICS_NAME = "metrics.json"


def _default_text() -> TextEncoderConfig:
    return TextEncoderConfig(kind="transformer", width=256, vocab_size=1024, max_length=64, depth=2,
                             d_head=64, d_ff=512)


@dataclass
class AlignConfig:
    image_size: int = 128                          # images are resized to image_size^2 before encoding
    in_channels: int = 1
    widths: tuple[int, ...] = (32, 64, 128, 256)   # conv stages after a 4x4 patchify stem; each later stage halves
    embed_dim: int = 256                           # shared embedding width
    text: TextEncoderConfig = field(default_factory=_default_text)
    init_temperature: float = 0.07                 # CLIP's init: logits = cos / 0.07
    max_logit_scale: float = 100.0                 # CLIP clamps exp(logit_scale) at 100 for stability

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = from_dict(TextEncoderConfig, self.text, "text")
        self.widths = tuple(self.widths)
        if not (isinstance(self.image_size, int) and self.image_size >= 4 * 2 ** (len(self.widths) - 1)):
            raise ValueError(f"image_size must be an int >= {4 * 2 ** (len(self.widths) - 1)} "
                             f"(4x4 stem, then {len(self.widths) - 1} halvings), got {self.image_size!r}")
        if not self.widths or any(not isinstance(w, int) or w <= 0 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {self.widths!r}")
        if self.in_channels <= 0 or self.embed_dim <= 0:
            raise ValueError(f"in_channels and embed_dim must be positive, got {self.in_channels}, {self.embed_dim}")
        if self.text.kind != "transformer":
            raise ValueError(f"text.kind must be 'transformer' for the alignment model, got {self.text.kind!r}")
        if not 0 < self.init_temperature < 1 or self.max_logit_scale < 1 / self.init_temperature:
            raise ValueError(f"need 0 < init_temperature < 1 and max_logit_scale >= 1/init_temperature, got "
                             f"{self.init_temperature}, {self.max_logit_scale}")


# ---------------------------------------------------------------------------------------------
# the image tower: a small residual conv net
# ---------------------------------------------------------------------------------------------

def _groups(width: int) -> int:
    return math.gcd(8, width)  # GroupNorm groups that divide the width


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), x [B, C, H, W]; the second conv starts at zero."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(_groups(width), width), nn.GroupNorm(_groups(width), width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class ImageEncoder(nn.Module):
    """[B, C, S, S] -> [B, widths[-1]]: 4x4 patchify stem, ResBlock stages with stride-2 convs between
    them, then global average pooling (so it runs at any size, though it is trained at one)."""

    def __init__(self, cfg: AlignConfig):
        super().__init__()
        w = cfg.widths
        self.stem = nn.Conv2d(cfg.in_channels, w[0], 4, stride=4)
        layers = []
        for i, width in enumerate(w):
            layers.append(ResBlock(width))
            if i + 1 < len(w):
                layers.append(nn.Conv2d(width, w[i + 1], 3, stride=2, padding=1))  # halve H, W
        self.stages = nn.Sequential(*layers)
        self.out_norm = nn.GroupNorm(_groups(w[-1]), w[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))                 # [B, widths[-1], S/4/2^(n-1), ...]
        return F.silu(self.out_norm(x)).mean((2, 3))  # [B, widths[-1]]


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over logits [B, B] (row i = image i against every text j; pair i matches).

    Template prompts repeat within a batch. Identical prompts have identical embeddings, hence
    identical logit columns, and then this loss equals the version whose targets are spread
    over all matching prompts: no special case is needed, but its minimum is no longer 0 (a
    prompt that k images share contributes log(k)).
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square [B, B], got shape {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.T.float(), target)) / 2


class AlignModel(nn.Module):
    def __init__(self, cfg: AlignConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # a megamed PromptTokenizer, needed only to pass prompts as strings
        if tokenizer is not None and tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds text.vocab_size "
                             f"({cfg.text.vocab_size})")
        self.image_encoder = ImageEncoder(cfg)
        self.image_proj = nn.Linear(cfg.widths[-1], cfg.embed_dim, bias=False)
        self.text_encoder = TransformerTextEncoder(cfg.text)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this AlignModel has no tokenizer: pass (text_ids, text_mask) instead of strings")
        ids, mask = self.tokenizer.encode(list(texts), self.cfg.text.max_length)
        return ids.to(self.device), mask.to(self.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] (any H, W: resized to image_size) -> unit vectors [B, E]."""
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"images must be [B, {self.cfg.in_channels}, H, W], got shape {tuple(images.shape)}")
        s = self.cfg.image_size
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, texts) -> torch.Tensor:
        """texts: list[str] (needs the tokenizer) or (ids [B, L], mask [B, L]) -> unit vectors [B, E]."""
        ids, mask = self.tokenize(texts) if _is_str_list(texts) else texts
        pooled = self.text_encoder(ids.to(self.device), mask.to(self.device)).pooled  # [B, width]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, images: torch.Tensor, texts) -> torch.Tensor:
        """logits [B_img, B_txt] = exp(logit_scale) * cosine similarity."""
        img, txt = self.encode_image(images), self.encode_text(texts)
        return self.logit_scale.exp() * img @ txt.T

    def loss(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE (clip_loss) for a batch of matching (image, prompt) pairs."""
        if images.shape[0] != text_ids.shape[0] or images.shape[0] < 2:
            raise ValueError(f"need matching batches of >= 2 images and prompts, got {images.shape[0]} and "
                             f"{text_ids.shape[0]}")
        return clip_loss(self(images, (text_ids, text_mask)))  # logits [B, B]

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts) -> torch.Tensor:
        """Cosine similarity [B] of image i with prompt i (one prompt is broadcast to all images)."""
        img, txt = self.encode_image(images), self.encode_text(texts)
        if txt.shape[0] not in (1, img.shape[0]):
            raise ValueError(f"got {img.shape[0]} images but {txt.shape[0]} prompts (need as many, or one)")
        return (img * txt).sum(-1)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts) -> torch.Tensor:
        """Cosine similarity matrix [N_images, N_prompts]."""
        return self.encode_image(images) @ self.encode_text(texts).T

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))


def _is_str_list(texts) -> bool:
    return isinstance(texts, (list, tuple)) and len(texts) > 0 and all(isinstance(t, str) for t in texts)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------

def save_align(model: AlignModel, directory: str | Path, metrics: dict | None = None) -> Path:
    """Write DIR/{model.safetensors, config.json, tokenizer/[, metrics.json]} (temp files + rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "kind": "megamed-align"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    _write_json(directory / CONFIG_NAME, {"align": to_dict(model.cfg)})
    if model.tokenizer is not None:
        model.tokenizer.save(directory / TOKENIZER_DIR)
    if metrics is not None:
        _write_json(directory / METRICS_NAME, metrics)
    return directory


def load_align(directory: str | Path, device="cpu") -> AlignModel:
    """An AlignModel (eval mode) with its tokenizer, from a directory written by save_align."""
    from safetensors.torch import load_file

    from megamed.text.tokenizer import PromptTokenizer

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory}: not an alignment model directory (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}; train one with `megamed align train`)")
    data = json.loads((directory / CONFIG_NAME).read_text())
    if "align" not in data:
        raise ValueError(f"{directory / CONFIG_NAME}: no 'align' section (is this a diffusion model directory?)")
    cfg = from_dict(AlignConfig, data["align"], "align")
    tokenizer = PromptTokenizer.load(directory / TOKENIZER_DIR) if (directory / TOKENIZER_DIR).is_dir() else None
    model = AlignModel(cfg, tokenizer)
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.to(device).eval()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def retrieval_top1(model: AlignModel, dataset, *, batch_size: int = 64, progress: bool = False) -> dict:
    """Image -> text top-1 accuracy over the data set's distinct prompts.

    Each image is compared with every distinct prompt of the data set; it is correct when its
    own prompt scores highest. chance = 1 / n_prompts (uniform guessing); majority = the
    accuracy of always answering the most frequent prompt (the bar a collapsed model reaches).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    prompts = sorted({row["prompt"] for row in dataset.rows})
    index = {p: i for i, p in enumerate(prompts)}
    txt = torch.cat([model.encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    correct, counts = 0, torch.zeros(len(prompts))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="retrieval", disable=not progress):
        target = torch.tensor([index[p] for p in batch["prompt"]])
        pred = (model.encode_image(batch["image"]) @ txt.T).argmax(1).cpu()  # [b]
        correct += int((pred == target).sum())
        counts += torch.bincount(target, minlength=len(prompts)).float()
    model.train(was_training)
    n = len(dataset)
    return {"top1": correct / n, "n_images": n, "n_prompts": len(prompts), "chance": 1 / len(prompts),
            "majority": float(counts.max()) / n}


def loss_floor(prompts: list[str]) -> float:
    """The smallest clip_loss a batch with these prompts allows: mean over items of log(k), k = how
    many items of the batch share the item's prompt (0 when all prompts differ)."""
    counts = Counter(prompts)
    return sum(math.log(counts[p]) for p in prompts) / len(prompts)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_align(data_root: str | Path, out_dir: str | Path, *, size: int = 128, steps: int = 2000,
                batch_size: int = 32, lr: float = 5e-4, weight_decay: float = 0.05, warmup: int = 100,
                seed: int = 0, cfg: AlignConfig | None = None, device=None, workers: int = 0,
                progress: bool = True) -> dict:
    """Train an AlignModel on a megamed-layout data set; save it to out_dir; return the metrics.

    Uses the "train" split for training and the "val" split for retrieval accuracy (the train
    split, with a warning, when there is no val split). The tokenizer is megamed's template
    BPE (build_template_tokenizer), saved with the model.
    """
    from tqdm.auto import tqdm

    from megamed.data.layout import read_metadata
    from megamed.data.loaders import MegamedDataset
    from megamed.text.tokenizer import build_template_tokenizer

    for name, value in (("size", size), ("steps", steps)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (contrastive needs negatives), got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)

    tokenizer = build_template_tokenizer()
    if cfg is None:
        cfg = AlignConfig(image_size=size)
    if cfg.image_size != size:
        raise ValueError(f"size ({size}) must equal cfg.image_size ({cfg.image_size})")
    model = AlignModel(cfg, tokenizer).to(device)

    train_ds = MegamedDataset(data_root, "train", size)
    if any(row.get("split") == "val" for row in read_metadata(data_root)):
        val_ds = MegamedDataset(data_root, "val", size)
    else:
        log.warning("%s has no val split; reporting retrieval on the train split", data_root)
        val_ds = train_ds
    if len(train_ds) < 2:
        raise ValueError(f"{data_root}: the train split has {len(train_ds)} image(s); need at least 2")
    batch_size = min(batch_size, len(train_ds))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed))

    # no weight decay on gains, biases and the temperature (1-D / 0-D parameters), as CLIP
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))

    losses: list[float] = []
    floors: list[float] = []  # lowest loss reachable on each batch, given its repeated prompts
    step, bar = 0, tqdm(total=steps, desc="align", disable=not progress)
    model.train()
    while step < steps:
        for batch in loader:
            if step >= steps:
                break
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, min(warmup, steps))
            ids, mask = tokenizer.encode(list(batch["prompt"]), cfg.text.max_length)  # [B, L]
            loss = model.loss(batch["image"].to(device), ids.to(device), mask.to(device))
            if not math.isfinite(loss.item()):  # stop before a bad step reaches the weights
                raise FloatingPointError(f"align: non-finite loss {loss.item()} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            model.clamp_logit_scale()
            losses.append(loss.item())
            floors.append(loss_floor(list(batch["prompt"])))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", temp=f"{1 / model.logit_scale.exp().item():.3f}")
    bar.close()

    k = max(1, len(losses) // 10)  # average the first / last 10% of steps: single steps are noisy
    metrics = {"steps": steps, "batch_size": batch_size, "loss_first": sum(losses[:k]) / k,
               "loss_last": sum(losses[-k:]) / k, "loss_floor_first": sum(floors[:k]) / k,
               "loss_floor_last": sum(floors[-k:]) / k, "temperature": 1 / model.logit_scale.exp().item(),
               "eval_split": "val" if val_ds is not train_ds else "train"}
    metrics.update({f"retrieval_{key}": v for key, v in retrieval_top1(model, val_ds, progress=progress).items()})
    model.eval()
    save_align(model, out_dir, metrics)
    log.info("align: loss %.3f -> %.3f (floor %.3f); %s retrieval top-1 %.3f (chance %.3f, majority %.3f) "
             "over %d prompts; saved to %s", metrics["loss_first"], metrics["loss_last"], metrics["loss_floor_last"],
             metrics["eval_split"], metrics["retrieval_top1"], metrics["retrieval_chance"],
             metrics["retrieval_majority"], metrics["retrieval_n_prompts"], out_dir)
    return metrics
