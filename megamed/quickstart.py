"""The quickstart (`megamed quickstart --out DIR [--fast]`): everything megamed does, small, on a CPU.

    1. data     render a small example set into DIR/data (resumable: finished images are skipped)
    2. sample   draw the normal prompt and each single-finding prompt that the example set has,
                from the SHIPPED pretrained checkpoint (megamed/pretrained/small), on the same
                seeds for every prompt -> one grid per prompt
    3. measure  cardiothoracic ratio (megamed.measure) of "cardiomegaly" vs "normal" samples on
                the same seeds, and of the example set's own images as the reference effect
    4. train    a short training from scratch on DIR/data (loss curve: the loss falls)
    5. report   DIR/report.html with the grids next to example-set images of the same prompt,
                the measurement table, the loss curve, timings and versions

Each stage prints one summary line with its wall time; DIR/summary.json holds all numbers.
Everything is a function of the config (seeds included), so a rerun draws the same images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STAGES = ("data", "sample", "measure", "train", "report")
VIEW = "PA"                     # every generated prompt names the PA view, like most of the data


@dataclass
class QuickstartConfig:
    count: int = 80             # example images (rendered at data_size)
    data_size: int = 128
    data_seed: int = 0
    bodies: int | None = 16     # distinct bodies in the example set
    workers: int = 2            # render processes
    n_per_prompt: int = 4       # images per prompt in the grids
    measure_n: int = 12         # images per prompt for the cardiomegaly-vs-normal measurement
    seed: int = 0               # sample seeds: seed, seed + 1, ... for every prompt
    sample_steps: int = 20
    guidance: float = 3.0
    train_config: str = "tiny"  # model config name for the from-scratch training stage
    train_size: int = 64
    train_steps: int = 150
    train_batch: int = 8
    train_lr: float = 3e-4
    pretrained: str = ""        # model dir; "" = the shipped megamed/pretrained/small

    def __post_init__(self):
        for name in ("count", "data_size", "workers", "n_per_prompt", "measure_n", "sample_steps",
                     "train_size", "train_steps", "train_batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.data_size < 32:
            raise ValueError(f"data_size must be >= 32, got {self.data_size}")
        if self.guidance < 0 or not self.train_lr > 0:
            raise ValueError(f"guidance must be >= 0 and train_lr > 0, got {self.guidance}, {self.train_lr}")


# --fast: the whole pipeline in about a minute (tests, smoke checks); numbers are not meaningful.
# data_seed=30 plans a normal and a cardiomegaly-only image among the 4, so every stage has work.
FAST = dict(count=4, data_seed=30, data_size=32, bodies=1, workers=1, n_per_prompt=2, measure_n=2, sample_steps=3,
            train_size=32, train_steps=24, train_batch=4, train_lr=1e-3)


def shipped_model_dir() -> Path:
    """megamed/pretrained/small, found through the package (works from a wheel too)."""
    return Path(__file__).resolve().parent / "pretrained" / "small"


def _stage_line(i: int, name: str, seconds: float, text: str) -> None:
    print(f"[{i}/{len(STAGES)}] {name:8s} {seconds:7.1f} s  {text}", flush=True)


# -----------------------------------------------------------------------------------------
# prompts and reference images from the example set

def single_finding_prompts(rows: list[dict]) -> dict[str, str]:
    """{"No Finding": normal prompt, finding: prompt} for each simulated finding in the data.

    A finding's prompt is what the data set calls an image with that finding alone (its implied
    labels included: cardiomegaly also makes "enlarged cardiomediastinum" positive)."""
    from megamed.data.findings import FINDINGS, labels_for
    from megamed.text.prompts import prompt_from_labels

    present = set()
    for r in rows:
        present |= set(json.loads(r["findings"]) if r.get("findings") else {})
    out = {"No Finding": prompt_from_labels(labels_for({}), view=VIEW)}
    for name in sorted(FINDINGS):
        if name in present:
            out[name] = prompt_from_labels(labels_for({name: {}}), view=VIEW)
    return out


def reference_rows(rows: list[dict], finding: str, k: int) -> list[dict]:
    """Up to k example rows for a prompt: rows with exactly that finding first (PA first), then
    rows that have it with the fewest other findings. "No Finding" = rows with no findings."""
    def findings_of(r):
        return set(json.loads(r["findings"]) if r.get("findings") else {})

    if finding == "No Finding":
        cand = [r for r in rows if not findings_of(r)]
    else:
        cand = [r for r in rows if finding in findings_of(r)]
    cand.sort(key=lambda r: (len(findings_of(r)), r.get("AP/PA") != VIEW, r["Path"]))
    return cand[:k]


def load_resized(path: Path, size: int) -> np.ndarray:
    """[size, size] float in [0, 1] (box-filtered, as a training loader would see it)."""
    from PIL import Image

    from megamed.data.images import read_image

    img = read_image(path)
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BOX), dtype=np.float32)
    return np.clip(img, 0, 1)


def grid01(images: list[np.ndarray], ncol: int | None = None) -> np.ndarray:
    import torch

    from megamed.generate import make_grid

    return make_grid(torch.from_numpy(np.stack(images)[:, None].astype(np.float32)), ncol=ncol).numpy()


# -----------------------------------------------------------------------------------------
# the stages

def stage_data(out: Path, cfg: QuickstartConfig) -> dict:
    from megamed.data.example import ExampleConfig, generate
    from megamed.data.layout import read_metadata

    rendered = generate(out / "data", ExampleConfig(count=cfg.count, size=cfg.data_size, seed=cfg.data_seed,
                                                    workers=cfg.workers, bodies=cfg.bodies))
    rows = read_metadata(out / "data")
    return {"images": len(rows), "rendered": rendered, "skipped": len(rows) - rendered}


def stage_sample(out: Path, cfg: QuickstartConfig, rows: list[dict], model_dir: Path) -> dict:
    """Grids per prompt (same seeds) and the raw images of normal/cardiomegaly for measuring."""
    from megamed.generate import SamplingConfig, load_pipeline, sample_images, to_unit
    from megamed.report import save_png8

    pipe = load_pipeline(model_dir, device="auto")
    size = pipe.default_resolution
    prompts = single_finding_prompts(rows)
    # normal and cardiomegaly get measure_n seeds (the grid shows the first n_per_prompt)
    counts = {f: max(cfg.n_per_prompt, cfg.measure_n) if f in ("No Finding", "Cardiomegaly") else cfg.n_per_prompt
              for f in prompts}
    all_prompts, all_seeds = [], []
    for f, p in prompts.items():
        all_prompts += [p] * counts[f]
        all_seeds += [cfg.seed + i for i in range(counts[f])]
    scfg = SamplingConfig(steps=cfg.sample_steps, guidance=cfg.guidance)
    images = sample_images(pipe.model, pipe.diffusion, pipe.tokenizer, all_prompts, all_seeds, height=size,
                           width=size, cfg=scfg, batch_size=8, progress=True)
    images = to_unit(images)[:, 0].numpy()  # [N, size, size] in [0, 1]

    per_prompt, start = {}, 0
    for f, p in prompts.items():
        imgs = list(images[start:start + counts[f]])
        start += counts[f]
        slug = f.lower().replace(" ", "_")
        refs = [load_resized(out / "data" / r["Path"], size) for r in reference_rows(rows, f, cfg.n_per_prompt)]
        gen_png = save_png8(out / "images" / f"generated_{slug}.png", grid01(imgs[:cfg.n_per_prompt]))
        ref_png = save_png8(out / "images" / f"reference_{slug}.png", grid01(refs)) if refs else None
        per_prompt[f] = {"prompt": p, "images": imgs, "generated_png": gen_png.relative_to(out).as_posix(),
                         "reference_png": ref_png.relative_to(out).as_posix() if ref_png else None,
                         "n_reference": len(refs)}
    return {"size": size, "model_hash": pipe.model_hash, "model_dir": str(model_dir),
            "model_step": _model_step(model_dir), "n_images": len(all_prompts), "sampling": dataclasses.asdict(scfg),
            "seeds": [cfg.seed + i for i in range(cfg.n_per_prompt)], "prompts": per_prompt}


def _model_step(model_dir: Path):
    from megamed.models.io import load_config_dict

    return load_config_dict(model_dir).get("step")


def _stats(values: list[float]) -> dict:
    ok = [v for v in values if math.isfinite(v)]
    return {"n": len(values), "measured": len(ok), "mean": float(np.mean(ok)) if ok else math.nan,
            "sd": float(np.std(ok, ddof=1)) if len(ok) > 1 else math.nan}


def stage_measure(out: Path, cfg: QuickstartConfig, rows: list[dict], sampled: dict) -> dict:
    """CTR of generated normal vs cardiomegaly (paired by seed) and of the example set's images."""
    from megamed.measure import cardiothoracic_ratio

    size = sampled["size"]
    result = {"generated": {}, "example_set": {}}
    ctr = {}
    for f in ("No Finding", "Cardiomegaly"):
        if f not in sampled["prompts"]:
            continue
        ctr[f] = [cardiothoracic_ratio(im) for im in sampled["prompts"][f]["images"]]
        result["generated"][f] = {"prompt": sampled["prompts"][f]["prompt"], **_stats(ctr[f])}
        # the reference effect: the example set's own images (all views), at the model's size
        refs = reference_rows(rows, f, len(rows))
        if f == "Cardiomegaly":  # cardiomegaly alone, or with findings that leave the heart border alone
            refs = [r for r in refs if not {"Pleural Effusion", "Atelectasis"} & set(json.loads(r["findings"]))]
        result["example_set"][f] = _stats([cardiothoracic_ratio(load_resized(out / "data" / r["Path"], size))
                                           for r in refs])
    if len(ctr) == 2:
        # same seed, same starting noise: the difference is the prompt's effect on that image
        pairs = [c - n for n, c in zip(ctr["No Finding"], ctr["Cardiomegaly"]) if math.isfinite(n + c)]
        result["paired"] = {"pairs": len(pairs), "mean_difference": float(np.mean(pairs)) if pairs else math.nan,
                            "cardiomegaly_larger": int(sum(d > 0 for d in pairs))}
    return result


def stage_train(out: Path, cfg: QuickstartConfig) -> dict:
    """A short from-scratch run on DIR/data (all splits: it only has to show the loss falling)."""
    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config
    from megamed.report import plot_loss
    from megamed.train import TrainConfig, train
    from megamed.train.config import load_run_config

    run = out / "train"
    model_cfg = load_model_config(cfg.train_config)
    tcfg = TrainConfig(data=str((out / "data").resolve()), split=None, size=cfg.train_size, max_steps=cfg.train_steps,
                       batch_size=cfg.train_batch, lr=cfg.train_lr, warmup_steps=min(20, cfg.train_steps // 5),
                       save_every=cfg.train_steps, log_every=max(1, cfg.train_steps // 50), tensorboard=False,
                       keep_last=1, seed=cfg.seed)
    if (run / "config.json").is_file() and load_run_config(run)[2] != tcfg:
        shutil.rmtree(run)  # a different quickstart config: start this stage over
    from megamed.train.checkpoint import latest_checkpoint

    # resume only what an earlier quickstart left (a rerun skips finished training)
    resume = (run / "config.json").is_file() and latest_checkpoint(run) is not None
    result = train(run, model_cfg, DiffusionConfig(), tcfg, resume=resume, progress=True)
    steps, losses = _read_losses(run / "logs" / "metrics.csv")
    q = max(1, len(losses) // 4)
    plot_loss(steps, losses, out / "images" / "loss.png",
              title=f"from scratch: '{cfg.train_config}' at {cfg.train_size}px, batch {cfg.train_batch}")
    return {"steps": result["step"], "images_per_s": result["images_per_s"], "loss_png": "images/loss.png",
            "loss_first_quarter": float(np.mean(losses[:q])), "loss_last_quarter": float(np.mean(losses[-q:])),
            "logged": len(losses), "metrics_csv": "train/logs/metrics.csv"}


def _read_losses(path: Path) -> tuple[list[int], list[float]]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no logged steps")
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


# -----------------------------------------------------------------------------------------
# the report

def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def measurement_verdict(m: dict) -> str:
    """One honest sentence on what the measurement shows."""
    p, g = m.get("paired"), m["generated"]
    if not p or p["pairs"] == 0:
        return ("The cardiac silhouette could not be measured on enough generated images (no two lungs "
                "found), so this checkpoint's cardiomegaly prompt is not verified here.")
    ref = m["example_set"]
    ref_diff = ref["Cardiomegaly"]["mean"] - ref["No Finding"]["mean"] if len(ref) == 2 else math.nan
    text = (f"On {p['pairs']} seeds measurable under both prompts, the cardiomegaly prompt changes the "
            f"cardiothoracic ratio by {p['mean_difference']:+.3f} on average (larger on "
            f"{p['cardiomegaly_larger']}/{p['pairs']} seeds); in the example set itself the difference is "
            f"{_fmt(ref_diff)}. ")
    if p["mean_difference"] > 0 and p["cardiomegaly_larger"] > p["pairs"] / 2:
        text += "The generated hearts are wider with the cardiomegaly prompt, in the direction of the data."
    else:
        text += "The generated images do NOT show a wider heart for the cardiomegaly prompt: this checkpoint " \
                "has not (measurably) learned that finding."
    n_gen = sum(v["n"] for v in g.values())
    n_ok = sum(v["measured"] for v in g.values())
    return text + f" ({n_ok}/{n_gen} generated images were measurable.)"


def write_report(out: Path, cfg: QuickstartConfig, summary: dict) -> Path:
    from megamed.report import esc, image, page, table

    s, m, t = summary["sample"], summary["measure"], summary["train"]
    shipped = Path(s["model_dir"]).resolve() == shipped_model_dir()
    which = "the shipped checkpoint <code>megamed/pretrained/small</code>" if shipped else \
        f"the checkpoint <code>{esc(s['model_dir'])}</code>"
    parts = [f"<p class=note>Made by <code>megamed quickstart</code> in {summary['total_s']:.0f} s. "
             f"Generated: {which} (step "
             f"{esc(s['model_step'])}, weights {esc(s['model_hash'])}) at {s['size']}x{s['size']}, "
             f"{s['sampling']['sampler']} {s['sampling']['steps']} steps, guidance {s['sampling']['guidance']}, "
             f"seeds {esc(s['seeds'])} for every prompt (so columns are comparable across rows). "
             f"Reference: images of the example set with that finding (alone where possible), resized to "
             f"{s['size']}x{s['size']}. All images are synthetic.</p>"]

    parts.append("<h2>Generated vs example set, per prompt</h2>")
    rows = []
    for f, p in s["prompts"].items():
        ref = image(p["reference_png"], f"reference {f}") if p["reference_png"] else "(none in the example set)"
        rows.append(f"<tr><td>{esc(f)}<br><span class=note>{esc(p['prompt'])}</span></td>"
                    f"<td>{image(p['generated_png'], f'generated {f}')}</td><td>{ref}</td></tr>")
    parts.append("<table><tr><th>prompt</th><th>generated (same seeds in every row)</th>"
                 "<th>example set</th></tr>" + "".join(rows) + "</table>")

    parts.append("<h2>Does the prompt change the heart? Cardiothoracic ratio</h2>")
    parts.append("<p class=note>megamed.measure.cardiothoracic_ratio, on the image alone: widest gap "
                 "between the lungs above their bases / widest span of the lungs.</p>")
    mrows = []
    for src, d in (("generated", m["generated"]), ("example set", m["example_set"])):
        for f, v in d.items():
            mrows.append([src, f, f"{v['measured']}/{v['n']}", _fmt(v["mean"]), _fmt(v["sd"])])
    parts.append(table(["images", "prompt / finding", "measured", "mean CTR", "sd"], mrows, numeric={2, 3, 4}))
    parts.append(f"<p>{esc(measurement_verdict(m))}</p>")

    parts.append("<h2>Training from scratch (the loss falls)</h2>")
    parts.append(f"<p>{t['steps']} steps of <code>{esc(cfg.train_config)}</code> at {cfg.train_size}px on the "
                 f"example set, {t['images_per_s']:.1f} images/s. Mean loss of the first quarter of logged "
                 f"steps {t['loss_first_quarter']:.4f}, of the last quarter {t['loss_last_quarter']:.4f}.</p>")
    parts.append(image(t["loss_png"], "loss curve", cls="plot"))

    parts.append("<h2>Timings</h2>")
    parts.append(table(["stage", "wall s", "summary"],
                       [[k, f"{v['seconds']:.1f}", v["line"]] for k, v in summary["stages"].items()], numeric={1}))
    parts.append("<h2>Versions</h2>")
    parts.append(table(["", ""], [[k, v] for k, v in summary["versions"].items()]))
    parts.append("<h2>Configuration</h2>")
    parts.append(table(["field", "value"], [[k, v] for k, v in dataclasses.asdict(cfg).items()]))
    path = out / "report.html"
    path.write_text(page("MegaMed quickstart", "\n".join(parts)))
    return path


# -----------------------------------------------------------------------------------------

def run(out: str | Path, cfg: QuickstartConfig | None = None) -> dict:
    """Run every stage into `out`; returns the summary (also written to out/summary.json)."""
    from megamed.data.layout import read_metadata
    from megamed.report import versions

    cfg = cfg or QuickstartConfig()
    out = Path(out)
    model_dir = Path(cfg.pretrained) if cfg.pretrained else shipped_model_dir()
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"pretrained: no model.safetensors in {model_dir}"
                                + ("" if cfg.pretrained else " (the shipped checkpoint is missing from this install;"
                                   " scripts/train_pretrained_small.sh makes it)"))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}
    t_all = time.perf_counter()

    def timed(i, name, fn, line):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        text = line(result)
        summary["stages"][name] = {"seconds": dt, "line": text}
        _stage_line(i, name, dt, text)
        return result

    summary["data"] = timed(1, "data", lambda: stage_data(out, cfg),
                            lambda r: f"{r['images']} images in {out / 'data'} ({r['rendered']} rendered, "
                                      f"{r['skipped']} already there)")
    rows = read_metadata(out / "data")
    sampled = timed(2, "sample", lambda: stage_sample(out, cfg, rows, model_dir),
                    lambda r: f"{r['n_images']} images for {len(r['prompts'])} prompts at {r['size']}px "
                              f"from {model_dir}")
    measured = timed(3, "measure", lambda: stage_measure(out, cfg, rows, sampled), _measure_line)
    summary["train"] = timed(4, "train", lambda: stage_train(out, cfg),
                             lambda r: f"{r['steps']} steps, loss {r['loss_first_quarter']:.3f} -> "
                                       f"{r['loss_last_quarter']:.3f} (first -> last quarter)")
    summary["sample"] = {k: v for k, v in sampled.items() if k != "prompts"}
    summary["sample"]["prompts"] = {f: {k: v for k, v in p.items() if k != "images"}
                                    for f, p in sampled["prompts"].items()}
    summary["measure"] = measured
    summary["versions"] = versions()
    summary["config"] = dataclasses.asdict(cfg)
    t0 = time.perf_counter()
    summary["total_s"] = t0 - t_all
    report = write_report(out, cfg, summary)
    dt = time.perf_counter() - t0
    summary["stages"]["report"] = {"seconds": dt, "line": str(report)}
    _stage_line(5, "report", dt, str(report))
    summary["total_s"] = time.perf_counter() - t_all
    write_report(out, cfg, summary)  # again, so the report's timings include its own stage
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _measure_line(m: dict) -> str:
    g = m["generated"]
    parts = [f"{f}: CTR {_fmt(v['mean'])} ({v['measured']}/{v['n']} measured)" for f, v in g.items()]
    if "paired" in m:
        parts.append(f"paired diff {_fmt(m['paired']['mean_difference'], 3)}")
    return "; ".join(parts) or "no normal/cardiomegaly prompts in the example set"
