"""Sampling from a trained model: `megamed sample` (prompts -> PNGs) and `megamed generate`
(CheXpert label CSV -> a synthetic data set in megamed's layout, resumable).

Reproducibility rules:
  * image i of a call uses seed + i for its starting noise, so an image does not depend on the
    batch size or on which other images were made in the same call;
  * samplers that draw fresh noise while stepping (euler-ancestral, ddim with eta > 0) use one
    generator per batch, so for them images are sampled one at a time with that seed;
  * every PNG carries its provenance in text chunks (synthetic=true, prompt, seed, sampler,
    steps, guidance, model_hash, megamed_version, ...).

Pixel convention: the model works in [-1, 1]; PNGs store (x + 1) / 2 in 16 bits.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Samplers that take eta (fresh noise per step, from `generator`, when eta > 0) and their defaults.
ETA_DEFAULTS = {"ddim": 0.0, "euler-ancestral": 1.0}


@dataclass
class SamplingConfig:
    """How images are drawn; stored in PNG chunks and in generate's metadata params column."""
    steps: int = 20
    sampler: str = "dpmpp-2m"
    guidance: float = 3.0                              # classifier-free guidance scale; 1 = off
    guidance_interval: tuple[float, float] | None = None  # (lo, hi) sigma range where guidance applies
    negative_prompt: str = ""                          # "" = unconditional (text mask all False)
    eta: float | None = None                           # ddim / euler-ancestral noise; None = default (0 / 1)
    schedule: str = "karras"

    def __post_init__(self):
        from megamed.diffusion import SAMPLERS
        from megamed.diffusion.schedules import SCHEDULES

        if not (isinstance(self.steps, int) and self.steps > 0):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.eta is not None:
            if self.eta < 0:
                raise ValueError(f"eta must be >= 0, got {self.eta}")
            if self.sampler not in ETA_DEFAULTS:
                raise ValueError(f"eta only applies to {' / '.join(ETA_DEFAULTS)}, not {self.sampler!r}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo < hi:
                raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, "
                                 f"got {self.guidance_interval!r}")
            self.guidance_interval = (float(lo), float(hi))

    @property
    def sampler_kwargs(self) -> dict:
        """Extra keyword arguments for the sampler function ({"eta": ...} where it takes one)."""
        if self.sampler not in ETA_DEFAULTS:
            return {}
        return {"eta": ETA_DEFAULTS[self.sampler] if self.eta is None else float(self.eta)}

    @property
    def stochastic(self) -> bool:
        """True if the sampler draws fresh noise while stepping (it then uses a generator)."""
        return self.sampler_kwargs.get("eta", 0.0) > 0


@dataclass
class Pipeline:
    """A loaded model ready to sample: network, tokenizer, diffusion config and provenance."""
    model: torch.nn.Module
    tokenizer: object | None     # None for an unconditional model
    diffusion: object            # DiffusionConfig
    model_hash: str
    path: Path
    device: torch.device

    @property
    def default_resolution(self) -> int:
        return self.model.config.default_resolution


def model_hash(model_dir: str | Path) -> str:
    """First 16 hex digits of the sha256 of model.safetensors (identifies the weights)."""
    path = Path(model_dir) / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir (config.json + model.safetensors), or a training RUN dir -> RUN/model (EMA)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    raise ValueError(f"model: {path} is neither a model directory (with model.safetensors) nor a training "
                     f"run with an exported model (RUN/model/model.safetensors)")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def load_pipeline(path: str | Path, device: str = "auto") -> Pipeline:
    from megamed.diffusion import DiffusionConfig
    from megamed.models.io import from_pretrained
    from megamed.utils.dataclass_json import from_dict

    model_dir = resolve_model_dir(path)
    dev = resolve_device(device)
    model, tokenizer, config = from_pretrained(model_dir, device=dev)
    if "diffusion" not in config:
        raise ValueError(f"{model_dir}/config.json has no 'diffusion' section; export it with "
                         f"save_pretrained(..., extra={{'diffusion': ...}})")
    diffusion = from_dict(DiffusionConfig, config["diffusion"], "diffusion")
    return Pipeline(model.eval().requires_grad_(False), tokenizer, diffusion, model_hash(model_dir), model_dir, dev)


def encode_prompts(model, tokenizer, prompts: list[str], device) -> dict:
    """Conditioning kwargs for the model: {"text_ids" [B, L], "text_mask" [B, L]} ({} if unconditional)."""
    if not model.config.text.enabled:
        return {}
    if tokenizer is None:
        raise ValueError("this model has a text encoder but no tokenizer was saved with it (model_dir/tokenizer); "
                         "it cannot be conditioned on prompts")
    ids, mask = tokenizer.encode(list(prompts), model.config.text.max_length)
    return {"text_ids": ids.to(device), "text_mask": mask.to(device).bool()}


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Unit noise [N, C, H, W], image n drawn on CPU from its own seed (device independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_images(model, diffusion, tokenizer, prompts: list[str], seeds: list[int], *, height: int, width: int,
                  cfg: SamplingConfig | None = None, batch_size: int = 8, device=None,
                  progress: bool = True) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] (float32, CPU) for N prompts with N seeds.

    Each image's result depends only on (prompt, seed, sampling config, model), not on the batch.
    """
    from tqdm.auto import tqdm

    from megamed.diffusion import CFGDenoiser, Denoiser, get_sampler, get_sigmas

    cfg = cfg or SamplingConfig()
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    multiple = model.config.size_multiple
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} for this model, "
                         f"got {height}x{width}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cfg.stochastic and batch_size > 1:
        batch_size = 1  # one generator per batch: sample alone so the image only depends on its seed
    denoiser = Denoiser(model, diffusion)
    sampler = get_sampler(cfg.sampler)
    sampler_kwargs = cfg.sampler_kwargs
    # Karras schedule over [sigma_min, sigma_max], shifted for this resolution like training.
    sigmas = get_sigmas(cfg.schedule, cfg.steps, diffusion, height, width, device=device)
    shape = (model.config.in_channels, height, width)
    out = []
    bar = tqdm(total=len(prompts), desc="sample", unit="img", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start:start + batch_size]
        batch_seeds = seeds[start:start + batch_size]
        x = initial_noise(batch_seeds, shape).to(device) * sigmas[0]  # [b, C, H, W]
        cond = encode_prompts(model, tokenizer, batch_prompts, device)
        guided = denoiser
        if cfg.guidance != 1.0 and cond:
            # Unconditional = the same ids with an all-False mask (how training drops the text);
            # a negative prompt replaces it.
            if cfg.negative_prompt:
                uncond = encode_prompts(model, tokenizer, [cfg.negative_prompt] * len(batch_prompts), device)
            else:
                uncond = {"text_ids": cond["text_ids"], "text_mask": torch.zeros_like(cond["text_mask"])}
            guided = CFGDenoiser(denoiser, cfg.guidance, uncond=uncond, interval=cfg.guidance_interval)
        generator = None
        if cfg.stochastic:
            generator = torch.Generator(device=device).manual_seed(int(batch_seeds[0]) + (1 << 32))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = sampler(guided, x, sigmas, generator=generator, disable_progress=True, **sampler_kwargs, **cond)
        out.append(x.float().clamp(-1, 1).cpu())
        bar.update(len(batch_prompts))
    bar.close()
    return torch.cat(out) if out else torch.empty(0, *shape)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def make_grid(images01: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> one [H', W'] image, row-major, black padding."""
    if images01.ndim != 4 or images01.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(images01.shape)}")
    n, _, h, w = images01.shape
    ncol = ncol or min(n, 8)
    nrow = -(-n // ncol)
    grid = images01.new_zeros(nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = images01[i, 0]
    return grid


def provenance(pipe: Pipeline, cfg: SamplingConfig, *, prompt: str, seed: int, height: int, width: int) -> dict:
    """PNG text chunks for one generated image (all values are strings)."""
    from megamed import __version__

    return {
        "synthetic": "true",
        "prompt": prompt,
        "negative_prompt": cfg.negative_prompt,
        "seed": str(seed),
        "sampler": cfg.sampler,
        "steps": str(cfg.steps),
        "guidance": str(cfg.guidance),
        "guidance_interval": json.dumps(cfg.guidance_interval),
        "schedule": cfg.schedule,
        "eta": str(cfg.sampler_kwargs.get("eta", "")),
        "size": f"{height}x{width}",
        "model_hash": pipe.model_hash,
        "megamed_version": __version__,
    }


def save_image(path: str | Path, image: torch.Tensor, text: dict) -> None:
    """One [C, H, W] image in [-1, 1] -> 16-bit PNG with text chunks (atomic)."""
    from megamed.data.images import write_png16

    write_png16(path, to_unit(image)[0].numpy(), text=text)


def sample_to_dir(pipe: Pipeline, prompts: list[str], out_dir: str | Path, *, n: int = 1, seed: int = 0,
                  height: int | None = None, width: int | None = None, cfg: SamplingConfig | None = None,
                  batch_size: int = 8, grid: bool = False, progress: bool = True) -> list[Path]:
    """`megamed sample`: n images per prompt -> OUT/000000.png ... (+ OUT/grid.png). Image i has seed + i."""
    from tqdm.auto import tqdm

    from megamed.data.images import write_png16

    cfg = cfg or SamplingConfig()
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    height = height or pipe.default_resolution
    width = width or pipe.default_resolution
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, kept = [], []
    bar = tqdm(total=len(all_prompts), desc="sample", unit="img", disable=not progress)
    # batch by batch, written as they come: memory stays one batch (plus the grid, if asked)
    for start in range(0, len(all_prompts), batch_size):
        images = sample_images(pipe.model, pipe.diffusion, pipe.tokenizer, all_prompts[start:start + batch_size],
                               seeds[start:start + batch_size], height=height, width=width, cfg=cfg,
                               batch_size=batch_size, device=pipe.device, progress=False)
        for i, image in enumerate(images, start):
            path = out_dir / f"{i:06d}.png"
            save_image(path, image, provenance(pipe, cfg, prompt=all_prompts[i], seed=seeds[i], height=height,
                                               width=width))
            paths.append(path)
        if grid:
            kept.append(to_unit(images))
        bar.update(len(images))
    bar.close()
    if grid:
        text = provenance(pipe, cfg, prompt=" | ".join(prompts), seed=seed, height=height, width=width)
        write_png16(out_dir / "grid.png", make_grid(torch.cat(kept), ncol=n if len(prompts) > 1 else None).numpy(),
                    text=dict(text, grid=f"{len(prompts)} prompts x {n}"))
    return paths


# ---- megamed generate: a synthetic data set from a label CSV ---------------------------------

def _row_prompt(row: dict) -> str:
    """The row's own prompt if it has one, else the template prompt from its labels and view."""
    from megamed.data.layout import OBSERVATIONS
    from megamed.text.prompts import prompt_from_labels

    if (row.get("prompt") or "").strip():
        return row["prompt"].strip()
    labels = {name: row.get(name, "") for name in OBSERVATIONS}
    findings = json.loads(row["findings"]) if (row.get("findings") or "").strip() else None
    view = None
    if (row.get("Frontal/Lateral") or "").strip().lower() == "lateral":
        view = "lateral"
    elif (row.get("AP/PA") or "").strip().upper() in ("AP", "PA"):
        view = row["AP/PA"].strip().upper()
    return prompt_from_labels(labels, findings, view=view, detail=findings is not None)


def read_label_rows(path: str | Path) -> list[dict]:
    """Rows of a CheXpert-format CSV (any subset of the 14 observation columns, and/or a
    `prompt` column; Path, Sex, Age, view, split, findings are copied when present)."""
    import csv

    from megamed.data.layout import OBSERVATIONS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels: {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if not any(c in header for c in [*OBSERVATIONS, "prompt"]):
            raise ValueError(f"labels: {path} has none of the CheXpert observation columns "
                             f"({', '.join(OBSERVATIONS[:3])}, ...) nor a 'prompt' column")
        rows = list(reader)
    if not rows:
        raise ValueError(f"labels: {path} has no rows")
    return rows


def _expected_text_matches(path: Path, expected: dict) -> bool:
    """True if `path` is a complete PNG made with the same model, prompt, seed and settings."""
    from megamed.data.images import read_png_text

    try:
        text = read_png_text(path)
    except (ValueError, FileNotFoundError):
        return False
    keys = ("prompt", "seed", "model_hash", "size", "sampler", "steps", "guidance", "guidance_interval",
            "negative_prompt", "eta", "schedule")
    diff = [k for k in keys if text.get(k) != expected[k]]
    if diff:
        raise ValueError(f"{path} exists but was made with different settings ({', '.join(diff)}: "
                         f"{text.get(diff[0])!r} vs {expected[diff[0]]!r}); use a new --out or delete it")
    return True


def generate_dataset(pipe: Pipeline, labels_csv: str | Path, out_dir: str | Path, *, seed: int = 0,
                     size: int | None = None, cfg: SamplingConfig | None = None, batch_size: int = 8,
                     stop_after: int | None = None, progress: bool = True) -> dict:
    """`megamed generate`: one image per label row -> OUT/images/NNNNNN.png + OUT/metadata.csv.

    Resumable: row i always gets seed + i, complete PNGs already in OUT are kept (their text
    chunks are checked), and metadata.csv is rewritten atomically after every batch with all
    finished rows in row order. stop_after: stop after that many new images (tests, chunking).
    Returns {"total", "generated", "skipped", "done"}.
    """
    from tqdm.auto import tqdm

    from megamed.data.layout import CHEXPERT_COLUMNS, COLUMNS, image_path, write_metadata

    cfg = cfg or SamplingConfig()
    rows = read_label_rows(labels_csv)
    size = size or pipe.default_resolution
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "images").glob(".*.tmp"):  # write_png16's temp files from a killed run
        stale.unlink()
    params = dict(asdict(cfg), size=size, model_hash=pipe.model_hash, megamed_generate=True)

    def out_row(i: int, row: dict, prompt: str, s: int) -> dict:
        new = {c: row.get(c, "") for c in CHEXPERT_COLUMNS}
        new["Path"] = image_path(i)
        new["Sex"] = row.get("Sex") or "Unknown"
        new["Age"] = row.get("Age") or "Unknown"
        new.update(split=(row.get("split") or "train"), prompt=prompt, findings=row.get("findings", ""),
                   params=dict(params, seed=s, source_path=row.get("Path", "")))
        return new

    prompts = []  # all prompts first: a bad row fails before any sampling
    for line, row in enumerate(rows, start=2):
        try:
            prompts.append(_row_prompt(row))
        except ValueError as e:
            raise ValueError(f"labels: {labels_csv}:{line}: {e}") from e
    todo, done = [], {}
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        path = out_dir / image_path(i)
        expected = provenance(pipe, cfg, prompt=prompt, seed=seed + i, height=size, width=size)
        if path.is_file() and _expected_text_matches(path, expected):
            done[i] = out_row(i, row, prompt, seed + i)
        else:
            todo.append(i)
    skipped = len(done)
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = tqdm(total=len(rows), initial=skipped, desc="generate", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        images = sample_images(pipe.model, pipe.diffusion, pipe.tokenizer, [prompts[i] for i in idx],
                               [seed + i for i in idx], height=size, width=size, cfg=cfg,
                               batch_size=batch_size, device=pipe.device, progress=False)
        for i, image in zip(idx, images):
            save_image(out_dir / image_path(i), image,
                       provenance(pipe, cfg, prompt=prompts[i], seed=seed + i, height=size, width=size))
            done[i] = out_row(i, rows[i], prompts[i], seed + i)
        # after the PNGs: a listed row always has its image
        write_metadata(out_dir / "metadata.csv", [done[i] for i in sorted(done)], COLUMNS)
        bar.update(len(idx))
    bar.close()
    if not todo:
        write_metadata(out_dir / "metadata.csv", [done[i] for i in sorted(done)], COLUMNS)
    return {"total": len(rows), "generated": len(done) - skipped, "skipped": skipped, "done": len(done)}
