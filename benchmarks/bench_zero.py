"""GPU benchmark: does `large-1024` train inside 24 GiB under ZeRO + CPU offload, and does
`megamed train --plan` predict the peak? (run by gpu_check.sh; needs deepspeed on the machine)

    python benchmarks/bench_zero.py --out OUT_DIR [--config large-1024] [--size 1024] [--batch 1]
                                    [--cap-gib 24] [--steps 4] [--timeout-s 300]

Three set-ups, all with gradient checkpointing, batch 1 at 1024^2, bf16, on ONE GPU whose usable
memory is capped with torch.cuda.set_per_process_memory_fraction(cap / total):
    stage 0                       (expected out of memory: 16 B/param + activations)
    stage 3 + optimizer offload   (Adam states and fp32 master weights in CPU RAM)
    stage 3 + optimizer + params  (everything but the working layer in CPU RAM)
Each runs `megamed.train.train` in its own process (a fresh CUDA context, so one set-up's
fragmentation or OOM cannot leak into the next) on random images for --steps steps. The first
step is warm-up; images/s is measured over the rest from RUN/logs/metrics.csv. Checkpoint
writing is switched off (a 1 B-parameter save would dominate the run). Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved over the whole run; the plan's
prediction (states from the ZeRO formulas + measured activations + 1 GiB overhead) is printed
beside it with the error of the prediction. Results: OUT/zero.jsonl and OUT/zero.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETUPS = {   # name -> (stage, offload optimizer, offload params)
    "stage0": (0, False, False),
    "stage3+opt-offload": (3, True, False),
    "stage3+opt+param-offload": (3, True, True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="large-1024")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cap-gib", type=float, default=24.0, help="usable GPU memory per process (GiB)")
    p.add_argument("--steps", type=int, default=4, help="training steps per set-up (the first is warm-up)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per set-up")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of " + ", ".join(SETUPS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of this script's plumbing (e.g. --config tiny --size 32); no memory figures")
    p.add_argument("--one", choices=list(SETUPS), help=argparse.SUPPRESS)   # worker mode
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


class RandomImages:
    """`n` random images [1, S, S] in [-1, 1] with a fixed prompt: throughput does not depend on content."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, self.size, self.size, generator=g) * 2 - 1,
                "prompt": "Chest X-ray showing cardiomegaly", "index": i}


def worker(args) -> dict:
    """One set-up in this process: cap the GPU, train, report peak memory and images/s."""
    import torch

    import megamed.train.trainer as trainer
    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config
    from megamed.train import TrainConfig, zero
    from megamed.train.logging import read_metrics

    stage, off_opt, off_param = SETUPS[args.one]
    cuda = args.device == "cuda"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), 0)
    # no checkpoint writing: patch the save and export the loop calls at the last step
    zero.ZeroRun.save = lambda self, *a, **k: (None, None)
    trainer.export_model = lambda *a, **k: None
    row = {"setup": args.one, "stage": stage, "offload_optimizer": off_opt, "offload_param": off_param,
           "config": args.config, "size": args.size, "batch": args.batch, "cap_gib": args.cap_gib,
           "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "total_gib": total / 2**30}
    cfg = TrainConfig(size=args.size, batch_size=args.batch, max_steps=args.steps, warmup_steps=0, log_every=1,
                      save_every=10**9, grad_checkpointing=True, tensorboard=False, device=args.device, seed=0)
    ds = zero.build_config(stage, "cpu" if off_opt else None, "cpu" if off_param else None)
    with tempfile.TemporaryDirectory() as run:
        t0 = time.perf_counter()
        try:
            trainer.train(run, load_model_config(args.config), DiffusionConfig(), cfg,
                          data=RandomImages(max(8, args.batch * args.steps), args.size), progress=False,
                          deepspeed_config=ds)
            row["status"] = "ok"
        except trainer.TrainingOutOfMemory as e:
            row["status"], row["error"] = "OOM", str(e)
        except Exception as e:  # a benchmark row, not a crash (also an OOM outside a step, e.g. at set-up)
            row["status"] = "OOM" if isinstance(e, torch.OutOfMemoryError) else "error"
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows = read_metrics(run)
    row["wall_s"] = time.perf_counter() - t0
    if cuda:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if len(rows) >= 2:   # steady state: from the end of step 1 to the end of the last step
        row["images_per_s"] = (len(rows) - 1) * args.batch / (rows[-1]["wall_s"] - rows[0]["wall_s"])
    return row


def plan_rows(args) -> dict:
    """{setup: predicted GiB per GPU} from `megamed train --plan` (gradient checkpointing on, 1 GPU)."""
    from megamed.models import load_model_config
    from megamed.train.plan import format_plan, plan_memory

    plan = plan_memory(load_model_config(args.config), args.size, args.size, args.batch, gpus=1,
                       grad_checkpointing=True, progress=False)
    print(format_plan(plan, args.cap_gib), flush=True)
    out = {}
    for name, (stage, off_opt, off_param) in SETUPS.items():
        totals = [r["total_gib"] for r in plan["rows"] if (r["stage"], r["offload_optimizer"], r["offload_param"])
                  == (stage, off_opt, off_param)]
        out[name] = max(totals)   # rows differ only by CPU attention backend; take the largest
    return out


def main() -> None:
    args = parse_args()
    if args.one:
        args.result.write_text(json.dumps(worker(args)) + "\n")
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_zero.py needs a CUDA device (--device cpu: plumbing smoke run only)")
    from bench_na2d import Writer

    from megamed.train.zero import import_deepspeed

    import_deepspeed()
    predicted = plan_rows(args)
    w = Writer(args.out, "zero", ["setup", "status", "peak_allocated_gib", "peak_reserved_gib", "plan_gib",
                                  "plan_error_pct", "fits_cap", "images_per_s", "wall_s", "note"])
    for name in [s for s in args.setups.split(",") if s]:
        result = args.out / f"zero-{name}.json"
        cmd = [sys.executable, __file__, "--out", str(args.out), "--config", args.config, "--size", str(args.size),
               "--batch", str(args.batch), "--cap-gib", str(args.cap_gib), "--steps", str(args.steps),
               "--device", args.device, "--one", name, "--result", str(result)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            row = json.loads(result.read_text()) if result.is_file() else {
                "setup": name, "status": f"worker rc={done.returncode}", "note": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"setup": name, "status": f"timeout {args.timeout_s:g} s"}
        row["plan_gib"] = predicted[name]
        if row.get("status") == "ok" and "peak_reserved_gib" in row:
            row["plan_error_pct"] = 100 * (predicted[name] - row["peak_reserved_gib"]) / row["peak_reserved_gib"]
            row["fits_cap"] = row["peak_reserved_gib"] <= args.cap_gib
        row.setdefault("note", row.get("error", "")[:200])
        w.add(row)


if __name__ == "__main__":
    main()
