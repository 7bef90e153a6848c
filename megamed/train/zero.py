"""DeepSpeed ZeRO for megamed's trainer: one engine per rank, driven by trainer.train's loop.

    cfg = build_config(3, offload_optimizer="cpu")       # or load_config("my.json") / an example name
    dist = init_distributed("auto")                      # rank, world, local_rank, device
    run = ZeroRun(model, optimizer, diffusion_cfg, engine_config(cfg, train_cfg, dist), dist)
    losses = run.loss(x0, noise, sigma, **cond)          # [b_micro] per-sample losses
    run.backward(losses.mean()); grad_norm = run.step(); run.ema_update(decay)
    run.save(run_dir, step, state, keep_last) / run.load(checkpoint_dir)

What it adds to the single-process trainer, and why each piece looks the way it does:

- DeepSpeed directly (deepspeed.initialize), not accelerate, whose DeepSpeed plugin mis-counts
  processes on CPU. The engine gets megamed's own torch AdamW and does not own the LR: the
  trainer's LinearWarmup steps the same torch optimizer, so a ZeRO run and a single-process
  run follow the same schedule. DeepSpeed clips gradients itself ("gradient_clipping") because
  only it sees every partition of the gradient.
- Batch sizes are megamed's: --batch is the GLOBAL batch; each of the N ranks trains on its
  block of it (rng.local_slice) in --grad-accum-steps micro-batches, and draws each sample's
  noise with the sample's global batch position, so N ranks see exactly the single-process
  batch. engine_config fills DeepSpeed's three batch keys from that and refuses a JSON that
  says otherwise.
- bf16 on GPU (DeepSpeed's mixed precision: bf16 weights, fp32 master weights and Adam
  states in the optimizer partitions); fp32 on CPU, where the tests compare against the
  single-process trainer to float tolerance.
- EMA: stages 0-2 keep a full fp32 replica on every rank (the weights are replicated there
  anyway). Stage 3 keeps the EMA SHARDED like the weights: rank r averages its own partition
  p.ds_tensor (flattened, padded to ceil(numel / N)), on the CPU when anything is offloaded;
  the full EMA model exists only while it is gathered (to rank 0) to save or export.
- Checkpoints: engine.save_checkpoint into RUN/checkpoints/step-N.tmp/ (every rank writes its
  partition), then rank 0 adds megamed's state.pt / state.json and the gathered
  ema.safetensors and renames the folder into place (checkpoint.commit_checkpoint), as the
  single-process trainer does. Multi-node runs need RUN on a file system every node sees.
  Resuming at another world size: DeepSpeed refuses to re-partition a plain ZeRO checkpoint
  ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
  currently supported"), so load() first converts it with DeepSpeed's universal-checkpoint
  tool (deepspeed.checkpoint.ds_to_universal) into step-N/universal/ and loads that.
- Config validation: a JSON key megamed does not know is refused before any model is built,
  naming the key and the nearest known one (SUPPORTED_KEYS below is the documented list).
- On DeepSpeed's CPU accelerator, torch.distributed's gloo does the communication; the
  shared-memory collective op DeepSpeed would otherwise JIT-compile at start-up (~1 minute, a
  C++ compiler needed) is switched off (_disable_shm_comm).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megamed.train import checkpoint as ckpt

log = logging.getLogger(__name__)

INSTALL_HINT = 'DS_BUILD_OPS=0 pip install "deepspeed>=0.16"'
RUN_CONFIG = "deepspeed.json"          # RUN/deepspeed.json: the DeepSpeed config a run was started with
UNIVERSAL = "universal"                # step-N/universal/: the checkpoint converted for another world size


class DeepSpeedMissing(ImportError, RuntimeError):
    """deepspeed is not installed (an ImportError; also a RuntimeError so the CLI prints one line)."""


def import_deepspeed():
    """`import deepspeed`, or DeepSpeedMissing saying how to install it."""
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedMissing(f"--deepspeed/--zero-stage need DeepSpeed, which is not importable ({e}); "
                               f"install it with: {INSTALL_HINT}") from e
    return deepspeed


# ---------------------------------------------------------------------------------------------
# the DeepSpeed JSON: what megamed passes through, example configs, validation
# ---------------------------------------------------------------------------------------------

_OFFLOAD_OPTIMIZER = {"device": None, "nvme_path": None, "buffer_count": None, "pin_memory": None,
                      "pipeline_read": None, "pipeline_write": None, "fast_init": None, "ratio": None}
_OFFLOAD_PARAM = {"device": None, "nvme_path": None, "buffer_count": None, "buffer_size": None,
                  "max_in_cpu": None, "pin_memory": None}
# Keys megamed passes through to DeepSpeed: None = a value, dict = a section and its keys.
# The four batch/clipping keys are megamed's own (filled from --batch, --grad-accum-steps,
# --grad-clip and the world size); a JSON may only repeat the same values.
SUPPORTED_KEYS: dict = {
    "train_batch_size": None,
    "train_micro_batch_size_per_gpu": None,
    "gradient_accumulation_steps": None,
    "gradient_clipping": None,
    "bf16": {"enabled": None, "immediate_grad_update": None, "check_grad_overflow": None},
    "zero_optimization": {
        "stage": None, "offload_optimizer": _OFFLOAD_OPTIMIZER, "offload_param": _OFFLOAD_PARAM,
        "contiguous_gradients": None, "overlap_comm": None, "reduce_scatter": None, "reduce_bucket_size": None,
        "allgather_partitions": None, "allgather_bucket_size": None, "round_robin_gradients": None,
        "use_multi_rank_bucket_allreduce": None, "sub_group_size": None, "ignore_unused_parameters": None,
        "stage3_prefetch_bucket_size": None, "stage3_param_persistence_threshold": None,
        "stage3_model_persistence_threshold": None, "stage3_max_live_parameters": None,
        "stage3_max_reuse_distance": None, "stage3_gather_16bit_weights_on_model_save": None,
        "zero_hpz_partition_size": None, "zero_quantized_weights": None, "zero_quantized_gradients": None,
        "memory_efficient_linear": None,
    },
    "zero_allow_untested_optimizer": None,
    "zero_force_ds_cpu_optimizer": None,
    "communication_data_type": None,
    "prescale_gradients": None,
    "gradient_predivide_factor": None,
    "data_types": {"grad_accum_dtype": None},
    "checkpoint": {"tag_validation": None, "load_universal": None, "use_node_local_storage": None},
    "aio": {"block_size": None, "queue_depth": None, "intra_op_parallelism": None, "single_submit": None,
            "overlap_events": None, "use_gds": None},
    "steps_per_print": None,
    "wall_clock_breakdown": None,
    "memory_breakdown": None,
    "comms_logger": {"enabled": None, "verbose": None, "prof_all": None, "debug": None, "prof_ops": None},
}
# DeepSpeed keys megamed refuses, and why
REFUSED_KEYS = {
    "optimizer": "megamed builds torch's AdamW itself (--lr, --weight-decay); remove the key",
    "scheduler": "megamed's linear warmup (--warmup-steps) drives the learning rate; remove the key",
    "fp16": "fp16 needs loss scaling, which skips steps; use bf16 (the default on GPU)",
    "activation_checkpointing": "use --grad-checkpointing (megamed recomputes its transformer layers)",
}
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _nearest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.0)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(cfg, source: str = "deepspeed config") -> dict:
    """Check a DeepSpeed config dict against SUPPORTED_KEYS (nested sections too) and the few
    values megamed relies on; ValueError naming the key (and the nearest known key) otherwise."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")

    def walk(d: dict, known: dict, prefix: str):
        for key, value in d.items():
            name = prefix + key
            if not prefix and key in REFUSED_KEYS:
                raise ValueError(f"{source}: key {name!r} is not supported: {REFUSED_KEYS[key]}")
            if key not in known:
                raise ValueError(f"{source}: unknown key {name!r}{_nearest(key, known)}; "
                                 f"megamed passes only the keys listed in megamed.train.zero.SUPPORTED_KEYS")
            if isinstance(known[key], dict):
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: {name!r} must be an object, got {value!r}")
                walk(value, known[key], name + ".")

    walk(cfg, SUPPORTED_KEYS, "")
    zo = cfg.get("zero_optimization", {})
    stage = zo.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for section in ("offload_optimizer", "offload_param"):
        device = zo.get(section, {}).get("device", "none")
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"{source}: zero_optimization.{section}.device must be one of {OFFLOAD_DEVICES}, "
                             f"got {device!r}")
    off_opt, off_param = offload_flags(cfg)
    if off_opt and stage < 1:
        raise ValueError(f"{source}: zero_optimization.offload_optimizer needs stage >= 1, got stage {stage}")
    if off_param and stage != 3:
        raise ValueError(f"{source}: zero_optimization.offload_param needs stage 3, got stage {stage}")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offload_flags(cfg: dict) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) of a config."""
    zo = cfg.get("zero_optimization", {})
    return tuple(zo.get(s, {}).get("device", "none") not in (None, "none")  # type: ignore[return-value]
                 for s in ("offload_optimizer", "offload_param"))


def build_config(stage: int, offload_optimizer: str | None = None, offload_params: str | None = None) -> dict:
    """The config --zero-stage / --offload-optimizer / --offload-params stand for."""
    for name, v in (("offload_optimizer", offload_optimizer), ("offload_params", offload_params)):
        if v not in (None, "none", "cpu"):
            raise ValueError(f"{name} must be 'cpu' or 'none', got {v!r}")
    zo: dict = {"stage": stage}
    if offload_optimizer == "cpu":
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params == "cpu":
        zo["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict = {"zero_optimization": zo}
    if offload_optimizer == "cpu" or offload_params == "cpu":
        # DeepSpeed would otherwise insist on its own CPU Adam (a JIT-compiled op) for offload
        cfg["zero_force_ds_cpu_optimizer"] = False
    return validate_config(cfg, "--zero-stage/--offload-*")


def examples_dir() -> Path:
    """configs/deepspeed/: in an installed wheel megamed/configs/deepspeed, in a checkout the repo's."""
    here = Path(__file__).resolve().parents[1]           # megamed/
    for d in (here / "configs" / "deepspeed", here.parent / "configs" / "deepspeed"):
        if d.is_dir():
            return d
    return here.parent / "configs" / "deepspeed"


def list_examples() -> list[str]:
    return sorted(p.stem for p in examples_dir().glob("*.json"))


def load_config(spec: str | Path) -> dict:
    """A DeepSpeed JSON file, or the name of a shipped example (zero1, zero2, zero3, zero3-offload,
    ...), validated."""
    path = Path(spec)
    if not path.is_file() and not path.suffix and (examples_dir() / f"{spec}.json").is_file():
        path = examples_dir() / f"{spec}.json"
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed: {spec} is neither a JSON file nor a shipped example "
                                f"({', '.join(list_examples())})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed: {path} is not valid JSON ({e})") from e
    return validate_config(cfg, str(path))


def write_run_config(run_dir: str | Path, cfg: dict) -> Path:
    path = Path(run_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this run was started with DeepSpeed but its config is gone; "
                                f"pass --deepspeed CONFIG or --zero-stage N again")
    return validate_config(json.loads(path.read_text()), str(path))


def engine_config(cfg: dict, train_cfg, world: int, device: torch.device, *, universal: bool = False) -> dict:
    """The dict handed to deepspeed.initialize: cfg plus megamed's batch sizes and clipping,
    bf16 on GPU, torch's AdamW allowed (also with offload), DeepSpeed's own step printing off."""
    cfg = copy.deepcopy(validate_config(cfg))
    accum = train_cfg.grad_accum_steps
    if train_cfg.batch_size % (world * accum):
        raise ValueError(f"batch size {train_cfg.batch_size} must be divisible by world size {world} x "
                         f"grad_accum_steps {accum} (each rank trains on an equal share in equal micro-batches)")
    owned = {"train_batch_size": train_cfg.batch_size,
             "train_micro_batch_size_per_gpu": train_cfg.batch_size // (world * accum),
             "gradient_accumulation_steps": accum, "gradient_clipping": float(train_cfg.grad_clip)}
    for key, value in owned.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"deepspeed config: {key}={cfg[key]!r} disagrees with megamed's {value!r} (from --batch, "
                             f"--grad-accum-steps, --grad-clip and world size {world}); drop it from the JSON")
    cfg.update(owned)
    cfg.setdefault("bf16", {"enabled": device.type == "cuda"})
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 2**31 - 1)          # megamed logs the steps itself
    if universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disable_shm_comm(deepspeed) -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce (deepspeed_shm_comm,
    ~1 minute and a C++ compiler) when its communication backend starts; marking the op as not
    compatible makes it use plain gloo collectives. deepspeed.ops.__compatible_ops__ is a dict
    DeepSpeed probes once per process and then reads, so the edit holds."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _not_text_context(record) -> bool:
    """ZeRO-3 warns that it cannot see into the TextContext the text encoder returns; ZeroRun
    registers that module's own parameters with the top module instead (see there)."""
    return "TextContext" not in record.getMessage()


def init_distributed(device_name: str = "auto") -> Dist:
    """Join (or, launched without torchrun/deepspeed, form a one-process) process group: gloo on
    CPU, DeepSpeed's accelerator default (nccl) on CUDA, where rank r uses cuda:LOCAL_RANK."""
    if device_name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: with DeepSpeed every process uses cuda:LOCAL_RANK (or the CPU); pass "
                         f"--device auto, cuda or cpu, not {device_name!r}")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but CUDA is not available")
    on_cpu = device_name == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed first picks its accelerator
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:  # plain `megamed train`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed = import_deepspeed()
    import warnings

    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines drown megamed's progress output
    if _not_text_context not in ds_logger.filters:
        ds_logger.addFilter(_not_text_context)
    # torch deprecates the c10d names DeepSpeed calls; one warning per call site and rank is noise
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        _disable_shm_comm(deepspeed)
    elif on_cpu:
        raise ValueError(f"device: 'cpu' requested but DeepSpeed already chose the {accelerator.device_name()} "
                         f"accelerator in this process; set DS_ACCELERATOR=cpu before starting")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else accelerator.communication_backend_name(),
                                   verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------

class TrainingLoss(nn.Module):
    """Denoiser.loss as a forward(): DeepSpeed's engine can only call forward, and must own the
    module whose parameters it partitions (parameter names gain the prefix denoiser.inner_model.)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x0, noise, sigma, **cond):
        return self.denoiser.loss(x0, noise, sigma, **cond)  # [B] per-sample losses


def _torch_optimizer(opt):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO optimizers, bf16 optimizer)."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


@contextlib.contextmanager
def _scalar_parameters_survive_setup():
    """While deepspeed.initialize runs: DeepSpeed (0.19) sends each parameter from rank 0 viewed
    as bytes (p.data.view(torch.uint8)), in the engine's broadcast and in ZeRO-3's per-parameter
    set-up, and a 0-dim tensor (TokenSplit's lerp factor) cannot be viewed so. Around those two
    calls such a parameter is shape [1]; it gets its own shape back right after (ZeRO-3 gathers a
    parameter into p.ds_shape), before anything records shapes for the optimizer's flat buffers."""
    from unittest import mock

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    def as_own_shape(p):
        if hasattr(p, "ds_shape"):
            p.ds_shape = torch.Size([])
        if p.data.numel() == 1:        # (a partitioned ZeRO-3 parameter holds 0 elements)
            p.data = p.data.view(())

    def broadcast_model(engine, _orig=getattr(DeepSpeedEngine, "_broadcast_model", None)):
        scalars = [p for p in engine.module.parameters() if p.ndim == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            _orig(engine)
        finally:
            for p in scalars:
                as_own_shape(p)

    def zero_init_param(self, param, _orig=getattr(Init, "_zero_init_param", None)):
        if param.ndim != 0:
            return _orig(self, param)
        param.data = param.data.reshape(1)
        try:
            return _orig(self, param)
        finally:
            as_own_shape(param)

    with contextlib.ExitStack() as stack:   # (patch only what this DeepSpeed version has)
        for cls, name, fn in ((DeepSpeedEngine, "_broadcast_model", broadcast_model),
                              (Init, "_zero_init_param", zero_init_param)):
            if hasattr(cls, name):
                stack.enter_context(mock.patch.object(cls, name, fn))
        yield


def model_from_state(model_cfg, state: dict):
    """A MegaMedModel holding exactly `state` (fp32 CPU tensors): built on the meta device and
    given the tensors, so no second initialisation runs (a Hugging Face text encoder is built for
    real, like models.io.from_pretrained does)."""
    from megamed.models import make_model

    if model_cfg.text.kind == "hf":
        model = make_model(model_cfg)
        model.load_state_dict(state, strict=True)
    else:
        model = make_model(model_cfg, device="meta")
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class ZeroRun:
    """One rank's DeepSpeed engine, plus the EMA (replica for stages 0-2, shards for stage 3)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, diffusion_cfg, ds_config: dict,
                 dist: Dist):
        from megamed.diffusion import Denoiser

        deepspeed = import_deepspeed()
        self.model, self.dist, self.config = model, dist, ds_config
        self.stage = zero_stage(ds_config)
        self.offload_optimizer, self.offload_param = offload_flags(ds_config)
        self.bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
        self.params_total = sum(p.numel() for p in model.parameters())
        # stages 0-2: a full fp32 EMA replica, copied before DeepSpeed casts the weights to bf16
        self.ema_replica = (copy.deepcopy(model).eval().requires_grad_(False).to(dist.device)
                            if self.stage < 3 else None)
        self.shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
        # Stage 0 in fp32 steps torch's optimizer directly, and DeepSpeed's clipping there multiplies
        # every gradient by a [1]-shaped factor, which a 0-dim gradient cannot take: megamed clips
        # itself in step() (the gradients are already averaged across ranks by then).
        self.own_clip = None
        if self.stage == 0 and not self.bf16:
            self.own_clip = float(ds_config.get("gradient_clipping", 0.0))
            ds_config = dict(ds_config, gradient_clipping=0.0)
        with _scalar_parameters_survive_setup():
            self.engine, *_ = deepspeed.initialize(model=TrainingLoss(Denoiser(model, diffusion_cfg)),
                                                   optimizer=optimizer, config=ds_config)
        self.optimizer = _torch_optimizer(self.engine.optimizer)
        if self.stage == 3 and getattr(model, "text_encoder", None) is not None:
            # The text encoder returns a TextContext, whose tensors ZeRO-3 cannot see, so it never
            # re-gathers the encoder's own parameters (pos_emb) for backward. Registered with the
            # top module, they are gathered for the whole backward pass instead.
            for p in model.text_encoder.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self.engine.module, p)
        # (name, parameter) with tied names repeated, so a gathered state dict has every key
        self.named = list(model.named_parameters(remove_duplicate=False))
        self.ema_shards: dict[str, torch.Tensor] = {}
        if self.stage == 3:
            ema_device = torch.device("cpu") if self.offload_optimizer or self.offload_param else dist.device
            for name, p in model.named_parameters():  # rank r's flat partition [ceil(numel / N)]
                self.ema_shards[name] = p.ds_tensor.detach().to(ema_device, torch.float32, copy=True)

    # ---- one step --------------------------------------------------------------------------
    def loss(self, x0, noise, sigma, **cond) -> torch.Tensor:
        return self.engine(x0, noise, sigma, **cond)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (DeepSpeed divides it by the accumulation steps
        and reduces across ranks at the last micro-batch). DeepSpeed counts micro-batches in
        engine.step(), so it is called after every micro-batch but the last, where it is a no-op."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        """The optimizer step (DeepSpeed clips inside it; stage 0 in fp32: megamed, before it);
        returns the global gradient norm before clipping."""
        norm = None
        if self.own_clip is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.own_clip if self.own_clip > 0 else float("inf"))
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return float(norm)

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        from megamed.train.ema import ema_update

        if self.stage < 3:
            ema_update(self.ema_replica, self.model, decay)
            return
        for name, p in self.model.named_parameters():
            shard = self.ema_shards[name]
            shard.lerp_(p.ds_tensor.detach().to(shard.device, torch.float32), 1.0 - decay)

    def reduce(self, loss_sum: float, count: int, stop: bool) -> tuple[float, bool]:
        """(mean loss over the global batch, whether any rank was asked to stop): one collective
        per step, so every rank takes the same decision (NaN, SIGTERM) at the same step."""
        t = torch.tensor([loss_sum, float(count), float(stop)], dtype=torch.float64, device=self.dist.device)
        torch.distributed.all_reduce(t)
        return (t[0] / t[1]).item(), bool(t[2].item() > 0)

    def all_finite(self) -> tuple[bool, str | None]:
        """Whether every rank's weights (its partitions under stage 3) are finite, and one bad name."""
        bad = None
        for name, p in self.model.named_parameters():
            t = p.ds_tensor if self.stage == 3 else p
            if not torch.isfinite(t).all():
                bad = name
                break
        flag = torch.tensor([0.0 if bad else 1.0], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0), bad

    # ---- EMA, save, load ---------------------------------------------------------------------
    def ema_model(self) -> nn.Module | None:
        """The full fp32 EMA model on rank 0 (None on the others). Under stage 3 every rank must
        call this: the shards are gathered one parameter at a time into a CPU model on rank 0."""
        if self.stage < 3:
            return self.ema_replica if self.dist.is_main else None
        state: dict[str, torch.Tensor] = {}
        for name, p in self.named:
            shard = self.ema_shards[name].to(self.dist.device)
            parts = [torch.empty_like(shard) for _ in range(self.dist.world)]
            torch.distributed.all_gather(parts, shard)
            if self.dist.is_main:
                # (cloned: a view of the padded buffer would drag it into the saved file)
                state[name] = torch.cat(parts)[:p.ds_numel].view(self.shapes[name]).cpu().clone()
        if not self.dist.is_main:
            return None
        params = {name for name, _ in self.named}
        for name, t in self.model.state_dict().items():  # buffers are not partitioned: take them as they are
            if name not in params:
                state[name] = t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()
        return model_from_state(self.model.config, state)

    def stats(self) -> dict:
        """What this rank holds, in elements: parameters (its partitions under stage 3), fp32
        master weights and each Adam moment (its partition under stages 1-3), EMA (its shards
        under stage 3), against the model's total. Call after a step (Adam state is lazy)."""
        params_local = sum(p.ds_tensor.numel() if self.stage == 3 else p.numel() for p in self.model.parameters())
        master = sum(p.numel() for p in self.optimizer.state)  # the optimizer state is keyed by its fp32 params
        moments = sum(st["exp_avg"].numel() for st in self.optimizer.state.values() if "exp_avg" in st)
        return {"rank": self.dist.rank, "world_size": self.dist.world, "stage": self.stage,
                "offload_optimizer": self.offload_optimizer, "offload_param": self.offload_param,
                "bf16": self.bf16, "params_total": self.params_total, "params_local": params_local,
                "master_params_local": master, "adam_exp_avg_local": moments, "ema_local":
                sum(s.numel() for s in self.ema_shards.values()) if self.stage == 3 else self.params_total}

    def save(self, run_dir: Path, step: int, state: dict, keep_last: int) -> tuple[Path, nn.Module | None]:
        """Every rank: RUN/checkpoints/step-N/ (DeepSpeed's partitions + megamed's state.pt and the
        gathered ema.safetensors), atomically. Returns (path, the EMA model on rank 0 / None)."""
        from safetensors.torch import save_model

        root = ckpt.checkpoint_dir(run_dir)
        tmp = root / f"step-{step}.tmp"
        if self.dist.is_main:
            ckpt.begin_checkpoint(run_dir, step)
        barrier()
        self.engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
        ema = self.ema_model()
        if self.dist.is_main:
            save_model(ema, str(tmp / "ema.safetensors"))
            ckpt.write_state(tmp, step, dict(state, world_size=self.dist.world, zero_stage=self.stage))
        barrier()  # every rank's partition is on disk before the folder is renamed
        final = root / f"step-{step}"
        if self.dist.is_main:
            ckpt.commit_checkpoint(run_dir, tmp, step, keep_last)
        barrier()
        return final, ema

    def load(self, path: Path) -> dict:
        """Restore engine, optimizer partitions and EMA from step-N/ (converted to a universal
        checkpoint first if it was written at another world size); returns megamed's state."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        check_resume(path, self.config)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if needs_universal(path, self.dist.world):
            to_universal(path, self.dist, state["world_size"])
            load_dir, tag = path, UNIVERSAL
        else:
            load_dir, tag = path.parent, path.name
        # DeepSpeed's universal loader gives every param group group 0's hyper-parameters, so the
        # no-decay group (biases, norms, gains) would get weight decay; megamed's groups are fixed
        # by the run config: put them back (lr is the same in every group, and the scheduler's)
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"resume: DeepSpeed found no checkpoint in {load_dir / tag}")
        for group, hyper in zip(self.optimizer.param_groups, groups):
            group.update(hyper)
        if self.stage < 3:
            load_model(self.ema_replica, str(path / "ema.safetensors"), strict=True, device=str(self.dist.device))
        else:
            full = load_file(str(path / "ema.safetensors"))
            for name, shard in self.ema_shards.items():
                flat = full[name].flatten().float()
                n = shard.numel()
                part = flat[self.dist.rank * n:(self.dist.rank + 1) * n]
                shard.zero_()
                shard[:part.numel()].copy_(part)
        return state


def check_resume(path: Path, cfg: dict) -> None:
    """Refuse to resume DeepSpeed checkpoint step-N/ under another ZeRO stage, before anything is
    written: the partitions are laid out per stage, and DeepSpeed's own failure is a bare
    AssertionError deep inside load_checkpoint."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    if "zero_stage" not in state:
        raise ValueError(f"resume: {path} was written by the single-process trainer; a DeepSpeed run can "
                         f"not continue it (start a new run, or resume without --deepspeed)")
    if state["zero_stage"] != zero_stage(cfg):
        raise ValueError(f"resume: {path} was written under ZeRO stage {state['zero_stage']}, this run asks for "
                         f"stage {zero_stage(cfg)}; resume with --zero-stage {state['zero_stage']} (or without "
                         f"--zero-stage/--deepspeed to reuse the run's deepspeed.json)")


def needs_universal(path: Path, world: int) -> bool:
    """Whether DeepSpeed checkpoint step-N/ must be converted to load at `world` processes: it was
    written by another number, and partitions optimizer state (stage 0 keeps whole states)."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    return state.get("zero_stage", 0) > 0 and state.get("world_size", world) != world


def to_universal(path: Path, dist: Dist, written_by: int) -> Path:
    """step-N/universal/ from step-N/ with DeepSpeed's converter (rank 0, once), for loading at a
    world size other than the one that wrote it."""
    out = Path(path) / UNIVERSAL
    failure = None
    if dist.is_main and not out.is_dir():
        log.info("resume: %s was written by %d processes, this run has %d: converting it to a universal "
                 "checkpoint", path, written_by, dist.world)
        tmp = Path(path) / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            tmp.rename(out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = " | ".join(line.strip() for line in (done.stderr or done.stdout).strip().splitlines()[-1:])
    flag = torch.tensor([1.0 if failure else 0.0], device=dist.device)
    torch.distributed.all_reduce(flag)      # every rank learns whether rank 0's conversion worked
    if flag.item() > 0:
        raise RuntimeError(f"resume: {path} was written by {written_by} processes and this run has {dist.world}; "
                           f"DeepSpeed's universal-checkpoint conversion failed"
                           f"{f' ({failure})' if failure else ' on rank 0'}. Resume with {written_by} processes "
                           f"(ZeRO stages 1-2 cannot convert megamed's 0-dim parameters; stage 3 can)")
    return out


def fp32_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The training weights of a DeepSpeed step-N/ checkpoint on the CPU (no process group needed),
    keys as model.state_dict(): stages 1-3 reassemble the fp32 master copy from every rank's
    partition (DeepSpeed's zero_to_fp32); stage 0 keeps whole weights in its model file (under
    bf16 those are the bf16 weights, converted)."""
    import_deepspeed()
    path = Path(path)
    prefix = "denoiser.inner_model."
    if any(path.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# out of memory: say what ran, and what to try next (the plan's ZeRO formulas)
# ---------------------------------------------------------------------------------------------

def option_flags(option) -> str:
    flags = f"--zero-stage {option.stage}"
    if option.offload_optimizer:
        flags += " --offload-optimizer cpu"
    if option.offload_param:
        flags += " --offload-params cpu"
    return flags


def oom_message(*, step: int, stage: int | None, offload_optimizer: bool = False, offload_param: bool = False,
                world: int = 1, batch: int, micro_batch: int, size: int, grad_checkpointing: bool, params: int,
                largest_layer: int, gpu_gib: float | None = None) -> str:
    """One line for torch.OutOfMemoryError: what ran (stage, batch, resolution) and the next option
    from the plan: gradient checkpointing first; then, of the ZeRO options whose per-GPU model
    states (plan.model_state_bytes) are below the current ones, the cheapest to run (no offload
    before optimizer offload before parameter offload, then the lowest stage), as --plan ranks them."""
    from megamed.train.plan import GIB, OPTIONS, ZeroOption, model_state_bytes

    current = ZeroOption(stage or 0, offload_optimizer, offload_param)
    what = ("single process (no ZeRO)" if stage is None else current.name.replace("stage", "ZeRO stage"))
    have = model_state_bytes(params, largest_layer, world, current)[0]
    if not grad_checkpointing:
        nxt = "--grad-checkpointing (recompute each transformer layer in backward)"
    else:
        smaller = [o for o in OPTIONS if model_state_bytes(params, largest_layer, world, o)[0] < have]
        if smaller:
            best = min(smaller, key=lambda o: (o.offload_param, o.offload_optimizer, o.stage))
            after = model_state_bytes(params, largest_layer, world, best)[0]
            nxt = (f"{option_flags(best)} (model states {have / GIB:.1f} -> {after / GIB:.1f} GiB per GPU by the "
                   f"ZeRO formulas{'; on one GPU only offload saves memory' if world == 1 else ''})")
        else:
            nxt = ("a smaller micro-batch (--grad-accum-steps 2 halves the images per forward) or a smaller "
                   "--batch or --size")
    plan = (f"megamed train --plan --config CONFIG --size {size} --batch {micro_batch} --gpus {world}"
            + (f" --gpu-memory {gpu_gib:.0f}" if gpu_gib else ""))
    return (f"out of GPU memory at step {step}: {what}, {world} process(es), batch {batch} "
            f"({micro_batch} per GPU per forward), resolution {size}x{size}, gradient checkpointing "
            f"{'on' if grad_checkpointing else 'off'}. Next option from the plan: {nxt}. Full table: {plan}")
