"""Named feature extractors for FID/KID, precision/recall and memorisation, pinned by a hash.

A feature-space metric is only comparable between runs that used the same network with the same
weights, so every extractor carries `sha256` (of its weights) and results print it.

    spec (--extractor)               what it is                                      sha256 of
    "random-conv"                    fixed random-init conv net, seed 0. LAST RESORT:  its weights
                                     not a learned feature space; numbers compare only
                                     with other random-conv numbers (same hash)
    DIR with classifier.json         the judge classifier's penultimate features       classifier.safetensors
    FILE.safetensors / .pth / .pt    a torchvision-named DenseNet-121 state dict       the file
      (state dict)                   (e.g. torchxrayvision's, saved locally)
    FILE.pt / .pth (TorchScript)     any local TorchScript module; gets [B, 3, S, S]   the file
                                     in [0, 255] (the convention of the FID Inception
                                     TorchScript file: use it with --size 299)

Nothing is downloaded: every spec is a name built here or a local file.
Images go in as [B, 1, S, S] in [-1, 1] (what megamed.data.loaders serve).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from megamed.utils.hashing import file_sha256

RANDOM_CONV = "random-conv"
log = logging.getLogger(__name__)


@dataclass
class Extractor:
    name: str              # what to print next to the numbers
    sha256: str            # pins the weights
    fn: object             # callable: images [B, 1, S, S] in [-1, 1] -> features [B, D]
    note: str = ""         # caveat printed with the results (e.g. random weights)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def state_dict_sha256(module_or_sd) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------------------
# the last resort: a fixed random conv net

class RandomConvNet(nn.Module):
    """4 strided 3x3 convs (1 -> 32 -> 64 -> 128 -> 256) with ReLU, then mean + std pooling
    -> [B, 512]. Random features still separate blur, noise and layout; they are not a
    learned notion of "looks like an X-ray"."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = (1, 32, 64, 128, 256)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        with torch.no_grad():                       # explicit generator: the same weights on every machine
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * (2.0 / c.weight[0].numel()) ** 0.5)
                c.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < 16:
            raise ValueError(f"x: expected [B, 1, H, W] with H, W >= 16 (4 halvings, then a std), got {tuple(x.shape)}")
        for c in self.convs:
            x = F.relu(c(x))                        # [B, C, H/2^k, W/2^k]
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)   # [B, 2 * 256]


def random_conv(seed: int = 0) -> Extractor:
    net = RandomConvNet(seed).eval()
    return Extractor(f"{RANDOM_CONV}(seed={seed})", state_dict_sha256(net), _no_grad(net),
                     note="random-init conv net: not a learned feature space; compare only with the same hash")


def _no_grad(fn):
    def call(x):
        with torch.no_grad():
            return fn(x)
    return call


# -----------------------------------------------------------------------------------------
# learned extractors from local files

def classifier_extractor(path: str | Path) -> Extractor:
    """The judge classifier (a `megamed eval classifier train` output directory)."""
    from megamed.eval.classifier import WEIGHTS_NAME, load_classifier

    model = load_classifier(path)
    return Extractor(f"classifier:{Path(path).name}", file_sha256(Path(path) / WEIGHTS_NAME), _no_grad(model.embed))


def densenet_file_extractor(path: str | Path) -> Extractor:
    """A torchvision-named DenseNet-121 state dict file (.safetensors, or a torch.save'd dict)."""
    from megamed.eval.classifier import ClassifierConfig, DenseNetClassifier, load_backbone, read_state_dict

    path = Path(path)
    sd = read_state_dict(path)
    n_cls = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 14
    model = DenseNetClassifier(ClassifierConfig(num_classes=n_cls, findings=())).eval()
    load_backbone(model, sd, path)
    return Extractor(f"densenet121:{path.name}", file_sha256(path), _no_grad(model.embed),
                     note="features assume images in [-1, 1]; set input_scale for weights trained on other ranges")


def torchscript_extractor(path: str | Path) -> Extractor:
    """Any TorchScript module; fed [B, 3, S, S] in [0, 255]. A forward with a `return_features`
    argument (the FID Inception TorchScript file) is called with return_features=True."""
    path = Path(path)
    module = torch.jit.load(str(path), map_location="cpu").eval()
    wants_flag = "return_features" in str(getattr(module.forward, "schema", ""))

    def fn(x):
        x = ((x.clamp(-1, 1) + 1) * 127.5).expand(-1, 3, -1, -1)    # [B, 3, S, S] in [0, 255]
        with torch.no_grad():
            out = module(x, return_features=True) if wants_flag else module(x)
        return out.flatten(1)
    return Extractor(f"torchscript:{path.name}", file_sha256(path), fn)


def get_extractor(spec: str | Path | None = None) -> Extractor:
    """An Extractor from a --extractor spec (see the module docstring). None -> random-conv."""
    if spec is None:
        log.warning("no --extractor given: using %s (seed 0), a random-init net; pass the judge classifier's "
                    "directory for a learned feature space", RANDOM_CONV)
    if spec is None or str(spec) == RANDOM_CONV:
        return random_conv(0)
    s = str(spec)
    if s.startswith(RANDOM_CONV + ":"):                      # "random-conv:SEED"
        try:
            return random_conv(int(s.split(":", 1)[1]))
        except ValueError:
            raise ValueError(f"extractor: {s!r}: expected random-conv:SEED with an integer seed") from None
    path = Path(s)
    if path.is_dir():
        return classifier_extractor(path)
    if not path.is_file():
        raise ValueError(f"extractor: {s!r} is neither {RANDOM_CONV!r}, a classifier directory, nor a file")
    if path.suffix == ".safetensors":
        return densenet_file_extractor(path)
    try:                                                     # TorchScript archives load with jit.load only
        return torchscript_extractor(path)
    except RuntimeError:
        return densenet_file_extractor(path)


def extract(extractor: Extractor, images, batch_size: int = 32, desc: str = "features") -> np.ndarray:
    """Features [N, D] float64 of images: a [N, 1, S, S] tensor, or an iterable of data-set items
    / tensors (each [1, S, S] or [B, 1, S, S])."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: expected [N, 1, S, S], got {tuple(images.shape)}")
        batches = images.split(batch_size)
    else:
        batches = batched(images, batch_size)
    total = -(-len(images) // batch_size) if hasattr(images, "__len__") else None
    out = [extractor(b.float()).double().cpu().numpy()
           for b in tqdm(batches, desc=desc, unit="batch", total=total, leave=False)]
    if not out:
        raise ValueError("images: no images to extract features from")
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise ValueError(f"{extractor.name}: produced NaN/inf features")
    return feats


def extractor_line(result: dict) -> str:
    """Markdown line naming a result's extractor, its hash, and its caveat (if any)."""
    note = f" — **{result['extractor_note']}**" if result.get("extractor_note") else ""
    return f"Extractor `{result['extractor']}` sha256 `{result['extractor_sha256']}`{note}"


def batched(items, batch_size: int):
    """Stack data-set items (dicts with "image") or tensors ([1, S, S] or [B, 1, S, S]) into
    [batch_size, 1, S, S] batches (the last one smaller), reading items one at a time."""
    buf = []
    for it in items:
        t = it["image"] if isinstance(it, dict) else it
        buf.extend(t if t.ndim == 4 else [t])
        if len(buf) >= batch_size:
            yield torch.stack(buf[:batch_size])
            buf = buf[batch_size:]
    if buf:
        yield torch.stack(buf)


__all__ = ["Extractor", "get_extractor", "extract", "random_conv", "classifier_extractor",
           "densenet_file_extractor", "torchscript_extractor", "extractor_line", "batched", "state_dict_sha256", "file_sha256", "RANDOM_CONV"]
