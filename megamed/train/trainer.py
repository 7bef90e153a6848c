"""The training loop: `train(run_dir, model_cfg, diffusion_cfg, train_cfg, data) -> dict`.

One process (CPU or one GPU), or every process of a DeepSpeed ZeRO launch (megamed.train.zero:
the same loop, with the engine's forward/backward/step, sharded EMA and ZeRO checkpoints
plugged in at the few places marked `run`). Per step:

    batch      data-set indices from a per-epoch permutation keyed by (seed, epoch); with N
               processes, rank r takes block r of the global batch (rng.local_slice)
    x0         [b, C, S, S] images in [-1, 1]  (b = B / N)
    z, drop,   per-sample draws keyed by (seed, step, global batch position i): z [b] -> sigma [b]
    noise      (lognormal, shifted for the resolution), drop [b] (text mask -> all False, for
               CFG), noise [b, C, S, S]; so N processes draw exactly what one process draws
    loss       Denoiser.loss(x0, noise, sigma, text_ids, text_mask) [b] -> mean, in
               grad_accum_steps micro-batches (gradients summed, scaled to the batch mean)
    update     AdamW (linear warmup), grad-norm clipping, EMA (power warmup)

Everything random is a function of (seed, step), and the global RNG (dropout) is reseeded
from (seed, step) at every step, so a run resumed from a checkpoint continues bit-exactly
on CPU: the checkpoint holds weights, EMA, optimizer + scheduler state and the data position.

A non-finite loss or gradient stops training before the optimizer step with an error that
names the step and the batch's samples (under DeepSpeed, which clips and steps in one call, a
non-finite gradient is seen just after the step; nothing is saved from it); checkpoints are
only written from finite states, so the last good one is never overwritten. SIGTERM/SIGINT
finish the current step, write a checkpoint and return normally (interrupted=True); under
DeepSpeed every process stops at the same step. Out of GPU memory raises TrainingOutOfMemory
naming the set-up and the next option from the memory plan.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from megamed.train import checkpoint as ckpt
from megamed.train.telemetry import GpuTelemetry, format_short
from megamed.train import rng
from megamed.train.config import TrainConfig, load_run_config, resume_conflicts, save_run_config
from megamed.train.ema import ema_decay, ema_update
from megamed.train.logging import MetricsLogger

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Loss or gradient norm became NaN/Inf; the message names the step and the batch."""


class LinearWarmup:
    """LR multiplier: (step + 1) / warmup_steps during warmup, then 1. A class (not a lambda)
    so the scheduler's state_dict round-trips it."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)


# Fixed prompts for the sample grids: normal plus single findings, drawn with a fixed seed so
# grids at different steps are comparable.
SAMPLE_GRID_FINDINGS = [None, "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation",
                        "Edema", "Atelectasis", "Support Devices"]
SAMPLE_GRID_SEED = 1234


def sample_grid_prompts() -> list[str]:
    from megamed.text.prompts import prompt_from_labels

    return [prompt_from_labels({"No Finding": 1.0} if f is None else {f: 1.0}) for f in SAMPLE_GRID_FINDINGS]


def resolve_device(name: str) -> torch.device:
    from megamed.generate import resolve_device as _resolve

    return _resolve(name)


@functools.lru_cache(maxsize=1)
def _template_tokenizer():
    from megamed.text.tokenizer import build_template_tokenizer

    return build_template_tokenizer()  # deterministic BPE training (~1 s): build once per process


def load_tokenizer(spec: str, model_cfg):
    """'templates' -> the built-in prompt tokenizer (or, for a Hugging Face text encoder, the
    tokenizer saved beside it in text.hf_path); otherwise a saved tokenizer directory."""
    if not model_cfg.text.enabled:
        return None
    from megamed.text.tokenizer import HFTokenizer, load_tokenizer_dir

    if spec == "templates" and model_cfg.text.kind == "hf":
        tok = HFTokenizer.load(model_cfg.text.hf_path)
    elif spec == "templates":
        tok = _template_tokenizer()
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"tokenizer: {spec!r} is neither 'templates' nor a saved tokenizer directory")
        tok = load_tokenizer_dir(path)
    if model_cfg.text.kind == "hf" and not isinstance(tok, HFTokenizer):
        raise ValueError(f"tokenizer: a Hugging Face text encoder (text.kind='hf') needs its own tokenizer, "
                         f"not megamed's BPE; save it in {model_cfg.text.hf_path} or pass --tokenizer DIR")
    vocab = getattr(tok, "vocab_size", None)
    if model_cfg.text.kind == "transformer" and vocab is not None and vocab > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer: vocabulary of {vocab} ids does not fit the model's text.vocab_size="
                         f"{model_cfg.text.vocab_size}")
    return tok


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on biases, norms, gains, scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)


def open_dataset(data, cfg: TrainConfig, size: int):
    """A Dataset object is used as is; a directory is opened at `size` by megamed.data.loaders:
    megamed's layout (metadata.csv + images/, filtered to cfg.split), a CheXpert folder, or a
    plain image folder."""
    if isinstance(data, (str, Path)):
        from megamed.data.loaders import detect_kind
        from megamed.data.loaders import open_dataset as open_data

        if not Path(data).is_dir():
            raise ValueError(f"data: {data} is not a directory (expected metadata.csv + images/)")
        kind = detect_kind(data)
        kw = {} if kind == "folder" else {"split": cfg.split}  # a plain folder has no splits
        data = open_data(data, kind=kind, size=size, **kw)
    if len(data) == 0:
        raise ValueError(f"data: no items{f' in split {cfg.split!r}' if cfg.split else ''}")
    return data


def export_model(run_dir: Path, ema_model: nn.Module, tokenizer, diffusion_cfg, step: int,
                 name: str = "model") -> Path:
    """RUN/model/ = EMA weights via save_pretrained (+ diffusion config, tokenizer), swapped in atomically."""
    from megamed.models.io import save_pretrained
    from megamed.utils.dataclass_json import to_dict

    run_dir = Path(run_dir)
    final, tmp = run_dir / name, run_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(ema_model, tmp, tokenizer=tokenizer, extra={"diffusion": to_dict(diffusion_cfg), "step": step})
    old = run_dir / f"{name}.old.tmp"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def export_checkpoint(run_dir: str | Path, step: int | None = None, weights: str = "ema",
                      out: str | Path | None = None) -> Path:
    """RUN/model/ (or `out`) from checkpoint step-N of a run (default: the latest), the directory
    the trainer itself exports: its EMA weights (default), or weights="train" for the training
    weights (of a DeepSpeed run: the fp32 master copy reassembled from every rank's partition).
    Needs no process group or GPU."""
    from safetensors.torch import load_file

    from megamed.train.zero import fp32_weights, model_from_state

    run_dir = Path(run_dir)
    if weights not in ("ema", "train"):
        raise ValueError(f"weights must be 'ema' or 'train', got {weights!r}")
    model_cfg, diffusion_cfg, train_cfg = load_run_config(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{ckpt.checkpoint_dir(run_dir)}: no complete checkpoint to export")
    steps = {s: p for s, p in found}
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint step-{step} in {ckpt.checkpoint_dir(run_dir)} "
                                f"(there are steps {sorted(steps)})")
    path = steps[step] if step is not None else found[-1][1]
    if weights == "ema":
        state = load_file(str(path / "ema.safetensors"))
    elif (path / "model.safetensors").is_file():
        state = load_file(str(path / "model.safetensors"))
    else:
        state = fp32_weights(path)
    model = model_from_state(model_cfg, state)
    tokenizer = load_tokenizer(train_cfg.tokenizer, model_cfg)
    at = torch.load(path / "state.pt", map_location="cpu", weights_only=True)["step"]
    if out is None:
        return export_model(run_dir, model, tokenizer, diffusion_cfg, at)
    return export_model(Path(out).parent, model, tokenizer, diffusion_cfg, at, name=Path(out).name)


def write_sample_grid(run_dir: Path, ema_model, diffusion_cfg, tokenizer, size: int, cfg: TrainConfig,
                      step: int, logger: MetricsLogger) -> Path:
    """RUN/samples/step-N.png: the fixed prompts drawn by the EMA model."""
    from megamed.data.images import write_png16
    from megamed.generate import SamplingConfig, make_grid, sample_images, to_unit

    prompts = sample_grid_prompts()
    seeds = [SAMPLE_GRID_SEED + i for i in range(len(prompts))]
    scfg = SamplingConfig(steps=cfg.sample_steps, guidance=cfg.sample_guidance)
    was_training = ema_model.training
    ema_model.eval()
    # the samplers use explicit generators, but keep the global RNG untouched anyway
    with torch.random.fork_rng(devices=[]):
        images = sample_images(ema_model, diffusion_cfg, tokenizer, prompts, seeds, height=size, width=size,
                               cfg=scfg, batch_size=cfg.batch_size, progress=False)  # fits like a training batch
    ema_model.train(was_training)
    grid = make_grid(to_unit(images), ncol=4)  # [H', W'] in [0, 1]
    path = run_dir / "samples" / f"step-{step}.png"
    write_png16(path, grid.numpy(), text={"synthetic": "true", "step": str(step),
                                          "prompts": " | ".join(prompts), "seed": str(SAMPLE_GRID_SEED)})
    logger.add_image("samples", grid[None], step)
    return path


def _install_stop_handlers(stop: dict):
    """SIGTERM/SIGINT -> finish the step, checkpoint, return. Returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {}

    def handler(signum, frame):
        if stop.get("signal"):  # second signal: give up waiting for the step boundary
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and writing a checkpoint", stop["signal"])

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    return lambda: [signal.signal(s, h) for s, h in old.items()]


class TrainingOutOfMemory(RuntimeError):
    """torch.OutOfMemoryError during a step; the message names the set-up and the next option to try."""


def train(run_dir: str | Path, model_cfg, diffusion_cfg, train_cfg: TrainConfig, data=None, *,
          resume: bool = False, progress: bool = True, deepspeed_config: dict | None = None) -> dict:
    """Train (or resume) a run in `run_dir`; returns {"step", "steps_run", "loss", "images_per_s",
    "interrupted", "checkpoint", "model_dir", "world_size"} (+ "zero": what this rank holds).

    data: a data-set directory, or a Dataset whose items have "image" [C, S, S] in [-1, 1],
    "prompt" str and optionally "index"/"path"; default train_cfg.data.
    resume: continue from the latest checkpoint of run_dir (its config.json must match).
    deepspeed_config: train under DeepSpeed ZeRO with this config (megamed.train.zero; every
    process of a torchrun/deepspeed launch calls train); kept in RUN/deepspeed.json, which a
    resumed run (train_cfg.deepspeed) reuses unless a new config is given.
    """
    from torch.utils.data import DataLoader

    from megamed.diffusion import Denoiser, sigmas_from_normal
    from megamed.models import make_model
    from megamed.train.plan import largest_layer_params

    cfg = train_cfg
    if deepspeed_config is not None and not cfg.deepspeed:
        cfg = dataclasses.replace(cfg, deepspeed=True)
    run_dir = Path(run_dir)
    size = cfg.size or model_cfg.default_resolution
    if size % model_cfg.size_multiple:
        raise ValueError(f"size={size} must be a multiple of {model_cfg.size_multiple} for this model")

    # ---- processes: this one alone, or one of DeepSpeed's group ---------------------------------
    zero = dist = None
    if cfg.deepspeed:
        from megamed.train import zero

        # validated before anything is built or written (also when read back from the run)
        ds_config = (zero.validate_config(deepspeed_config) if deepspeed_config is not None
                     else zero.read_run_config(run_dir))
        dist = zero.init_distributed(cfg.device)
        device, rank, world = dist.device, dist.rank, dist.world
    else:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} (a torchrun/deepspeed launch), but this run has "
                             f"no --deepspeed/--zero-stage: megamed trains multi-process only under DeepSpeed "
                             f"(--zero-stage 0 is plain data parallel)")
        device, rank, world = resolve_device(cfg.device), 0, 1
    is_main = rank == 0
    accum = cfg.grad_accum_steps
    if cfg.batch_size % (world * accum):
        raise ValueError(f"batch size {cfg.batch_size} must be divisible by world size {world} x grad_accum_steps "
                         f"{accum}: every process trains on an equal share in equal micro-batches")
    part = rng.local_slice(cfg.batch_size, rank, world)      # this rank's positions in the global batch
    b_micro = (part.stop - part.start) // accum

    # ---- run directory: fresh, or resume with a matching config -------------------------------
    last = ckpt.latest_checkpoint(run_dir)
    if resume:
        if (run_dir / "config.json").is_file():
            stored_model, stored_diff, stored_train = load_run_config(run_dir)
            if stored_model != model_cfg or stored_diff != diffusion_cfg:
                raise ValueError(f"resume: the model/diffusion config differs from {run_dir}/config.json")
            conflicts = resume_conflicts(stored_train, {k: getattr(cfg, k) for k in vars(cfg)})
            if conflicts:
                raise ValueError("resume: train config differs from the run's: " + "; ".join(conflicts))
        if last is None:
            log.warning("resume: no checkpoint in %s yet; starting from step 0", ckpt.checkpoint_dir(run_dir))
    elif last is not None:
        raise ValueError(f"out: {run_dir} already has checkpoints (latest {last.name}); "
                         f"pass --resume to continue it or choose a new --out")
    if resume and last is not None and zero is not None:
        zero.check_resume(last, ds_config)  # same ZeRO stage, before RUN/deepspeed.json is rewritten
    dataset = open_dataset(cfg.data if data is None else data, cfg, size)
    n = len(dataset)
    tokenizer = load_tokenizer(cfg.tokenizer, model_cfg)
    # only now that the inputs are known good (records changed operational fields on resume)
    if is_main:
        save_run_config(run_dir, model_cfg, diffusion_cfg, cfg)
        if zero is not None:
            zero.write_run_config(run_dir, ds_config)

    # ---- model, EMA, optimizer ----------------------------------------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.init_seed(cfg.seed))
        model = make_model(model_cfg)
    largest_layer = largest_layer_params(model)               # for the out-of-memory message
    run = ema_model = denoiser = None
    model.train()
    if cfg.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    if zero is None:  # (under DeepSpeed the engine places, stage 3 partitions, the weights; ZeroRun keeps the EMA)
        model.to(device)
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        denoiser = Denoiser(model, diffusion_cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(cfg.warmup_steps))
    if zero is not None:
        universal = resume and last is not None and zero.needs_universal(last, world)  # another world size
        run = zero.ZeroRun(model, optimizer, diffusion_cfg,
                           zero.engine_config(ds_config, cfg, world, device, universal=universal), dist)

    step, epoch, offset = 0, 0, 0
    if resume and last is not None:
        if run is None:
            state = ckpt.load_checkpoint(last, model=model, ema_model=ema_model, optimizer=optimizer,
                                         scheduler=scheduler, device=device)
        else:
            state = run.load(last)
            scheduler.load_state_dict(state["scheduler"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        # every draw is re-keyed per step anyway; restoring the streams covers anything that is not
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if state.get("n_items", n) != n:
            raise ValueError(f"resume: the data set has {n} items but the run was trained on {state['n_items']}")
        log.info("resumed from %s (step %d, epoch %d, offset %d)", last, step, epoch, offset)
    if step >= cfg.max_steps:
        log.info("run is already at step %d >= max_steps=%d; nothing to do", step, cfg.max_steps)

    # The batch order is fixed by (seed, epoch, offset); workers only decode images. Each rank
    # loads its block of every global batch.
    plan = rng.BatchPlan(cfg.seed, n, cfg.batch_size, epoch, offset, max(0, cfg.max_steps - step), rank, world)
    loader = DataLoader(dataset, batch_sampler=plan, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    logger = MetricsLogger(run_dir, resume_step=step, tensorboard=cfg.tensorboard) if is_main else None
    # bf16 autocast on GPU; under DeepSpeed's bf16 (bf16 weights) also on CPU, so fp32 inputs meet bf16 weights
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or bool(run and run.bf16))
    params = [p for p in model.parameters() if p.requires_grad]
    compute_loss = denoiser.loss if run is None else run.loss

    def checkpoint_state() -> dict:
        state = {"epoch": epoch, "offset": offset, "n_items": n, "seed": cfg.seed, "loss": last_loss,
                 "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        return state

    def final_ema():
        """The EMA model on the main rank (gathered under ZeRO-3: every rank must call this)."""
        return ema_model if run is None else run.ema_model()

    def save(step: int) -> Path:
        # Finite grads can still step into inf weights (e.g. a huge LR); such a state must not
        # replace the last good checkpoint.
        if run is None:
            bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        else:
            finite, name = run.all_finite()
            bad = [] if finite else [name or "a weight on another rank"]
        if bad:
            raise NonFiniteLossError(f"weights became non-finite after step {step} (e.g. {bad[0]}); not saving. "
                                     f"Last good checkpoint: {ckpt.latest_checkpoint(run_dir) or 'none'}")
        if run is None:
            path = ckpt.save_checkpoint(run_dir, step, model=model, ema_model=ema_model, optimizer=optimizer,
                                        scheduler=scheduler, state=checkpoint_state(), keep_last=cfg.keep_last)
            ema = ema_model
        else:
            path, ema = run.save(run_dir, step, dict(checkpoint_state(), scheduler=scheduler.state_dict()),
                                 cfg.keep_last)
        if is_main:
            export_model(run_dir, ema, tokenizer, diffusion_cfg, step)
        return path

    def out_of_memory(step: int) -> str:
        from megamed.train.zero import oom_message

        gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        return oom_message(step=step, stage=None if run is None else run.stage,
                           offload_optimizer=run is not None and run.offload_optimizer,
                           offload_param=run is not None and run.offload_param, world=world,
                           batch=cfg.batch_size, micro_batch=b_micro, size=size,
                           grad_checkpointing=cfg.grad_checkpointing,
                           params=sum(p.numel() for p in params) if run is None else run.params_total,
                           largest_layer=largest_layer, gpu_gib=gib)

    from tqdm.auto import tqdm

    stop: dict = {}
    restore_handlers = _install_stop_handlers(stop)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not (progress and is_main),
               dynamic_ncols=True)
    # GPU telemetry (nvidia-ml-py) at every log step; switches itself off with one log line
    # where there is no driver or a query is not supported (MIG)
    telemetry = GpuTelemetry(cfg.log_every) if device.type == "cuda" and is_main else None
    gpu_text = ""
    start_step, last_loss, saved_step = step, float("nan"), (step if last is not None and resume else -1)
    stopping = False
    t_start = t_log = time.perf_counter()
    images_since_log, images_per_s, t_other, t_other_total = 0, 0.0, 0.0, 0.0
    try:
        for batch in loader:
            # ---- which samples: the plan's indices, and the data position after this batch ----
            indices, epoch, offset = rng.batch_at(cfg.seed, n, cfg.batch_size, epoch, offset)
            torch.manual_seed(rng.step_seed(cfg.seed, step, rank))  # dropout etc.: a function of the step

            x0 = batch["image"].to(device, non_blocking=True)  # [b, C, S, S] in [-1, 1], b = B / world
            # noise keyed by each sample's GLOBAL batch position: any world size draws the same
            z, drop, noise = rng.draw_training_noise(cfg.seed, step, range(part.start, part.stop),
                                                     tuple(x0.shape[1:]), cfg.cond_drop_prob)
            sigma = sigmas_from_normal(z, x0.shape[-2], x0.shape[-1], diffusion_cfg).to(device)  # [b]
            noise = noise.to(device)
            cond = {}
            if tokenizer is not None:
                ids, mask = tokenizer.encode(list(batch["prompt"]), model_cfg.text.max_length)  # [b, L]
                mask = mask.bool() & ~drop[:, None]  # dropped samples see no text (unconditional)
                cond = {"text_ids": ids.to(device), "text_mask": mask.to(device)}

            try:
                # ---- forward + backward, in `accum` micro-batches of b_micro samples ----------
                if run is None:
                    optimizer.zero_grad(set_to_none=True)
                losses = []
                for m in range(accum):
                    mb = slice(m * b_micro, (m + 1) * b_micro)
                    with amp:
                        losses_m = compute_loss(x0[mb], noise[mb], sigma[mb], **{k: v[mb] for k, v in cond.items()})
                    if run is None:  # the mean over the whole batch is the mean of the micro-batch means
                        (losses_m.mean() / accum if accum > 1 else losses_m.mean()).backward()
                    else:            # DeepSpeed divides by the accumulation steps itself
                        run.backward(losses_m.mean())
                    losses.append(losses_m.detach())
                losses = torch.cat(losses)  # [b], float32
                if run is None:
                    loss_value = losses.mean().item()
                else:  # every rank: the global batch's mean, and whether any rank got SIGTERM
                    loss_value, stopping = run.reduce(losses.double().sum().item(), losses.numel(),
                                                      bool(stop.get("signal")))
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(_nonfinite_message("loss", step + 1, batch, indices, losses, run_dir,
                                                                part.start))

                # ---- update: clip, AdamW, LR schedule, EMA -----------------------------------
                lr = scheduler.get_last_lr()[0]
                if run is None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
                else:  # DeepSpeed clips and steps in one call: a non-finite norm is seen after the step
                    grad_norm = run.step()
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(_nonfinite_message("gradient norm", step + 1, batch, indices, losses,
                                                                run_dir, part.start))
                if run is None:
                    optimizer.step()
                scheduler.step()
                decay = ema_decay(step, power=cfg.ema_power, max_decay=cfg.ema_decay)
                if run is None:
                    ema_update(ema_model, model, decay)
                else:
                    run.ema_update(decay)
            except torch.OutOfMemoryError as e:
                raise TrainingOutOfMemory(out_of_memory(step + 1)) from e
            step += 1
            last_loss = loss_value
            if run is None:
                stopping = bool(stop.get("signal"))
            # (under DeepSpeed only run.reduce decides, for every rank at once: a signal that lands
            # on one rank after it is taken up at the next step's reduce, else that rank would
            # break into save()'s collectives while the others start the next step, and hang)

            # ---- bookkeeping: progress, metrics, checkpoints, samples ----------------------
            images_since_log += cfg.batch_size
            bar.update(1)
            if is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.perf_counter()
                # throughput of training alone: checkpoint and sample-grid time is left out
                images_per_s = images_since_log / max(now - t_log - t_other, 1e-9)
                t_log, t_other, images_since_log = now, 0.0, 0
                logger.log(step, loss=loss_value, lr=lr, grad_norm=grad_norm, images_per_s=images_per_s,
                           epoch=epoch, wall_s=now - t_start)
                if telemetry is not None and telemetry.enabled:
                    gpu = telemetry.sample()
                    logger.log_gpu(step, telemetry.as_row(gpu))
                    gpu_text = format_short(gpu)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images_per_s:.1f}",
                                **({"gpu": gpu_text} if gpu_text else {}))
            t0 = time.perf_counter()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(step)
                saved_step = step
            if cfg.sample_every and step % cfg.sample_every == 0:
                ema = final_ema()
                if is_main:
                    write_sample_grid(run_dir, ema.to(device), diffusion_cfg, tokenizer, size, cfg, step, logger)
            t_other += time.perf_counter() - t0
            t_other_total += time.perf_counter() - t0
            if stopping:
                break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
        if telemetry is not None:
            telemetry.close()
        restore_handlers()

    interrupted = stopping and step < cfg.max_steps
    if saved_step != step and (interrupted or step > start_step):
        save(step)
    elif step == start_step and not (run_dir / "model").exists():
        ema = final_ema()
        if is_main:
            export_model(run_dir, ema, tokenizer, diffusion_cfg, step)
    if interrupted:
        log.warning("stopped by %s at step %d; checkpoint written. Continue with --resume",
                    stop.get("signal", "a signal to another process"), step)
    elapsed = time.perf_counter() - t_start - t_other_total
    steps_run = step - start_step
    result = {"step": step, "steps_run": steps_run, "loss": last_loss,
              "images_per_s": steps_run * cfg.batch_size / elapsed if steps_run else 0.0,
              "interrupted": interrupted, "checkpoint": str(ckpt.latest_checkpoint(run_dir)),
              "model_dir": str(run_dir / "model"), "world_size": world}
    if run is not None:
        # what this rank held (partitions): RUN/logs/zero-rank-R.json, for people and tests
        result["zero"] = run.stats()
        path = run_dir / "logs" / f"zero-rank-{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result["zero"], indent=2) + "\n")
    return result


def _nonfinite_message(what: str, step: int, batch: dict, indices: list[int], losses: torch.Tensor,
                       run_dir: Path, first: int = 0) -> str:
    """first: global batch position of this process's first sample (its losses are local)."""
    paths = batch.get("path")
    bad = [first + i for i, v in enumerate(losses.detach().float().cpu().tolist()) if not math.isfinite(v)]
    last = ckpt.latest_checkpoint(run_dir)
    where = f"sample indices {indices}" + (f", paths {list(paths)}" if paths is not None else "")
    which = f"; non-finite per-sample loss at batch positions {bad}" if bad else ""
    return (f"non-finite {what} at step {step} (batch: {where}{which}). Training stopped before the update; "
            f"last good checkpoint: {last if last else 'none'}")
