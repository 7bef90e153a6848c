"""Run by tests/test_zero.py as ONE launch of 2 processes, so DeepSpeed and the process group
start once for ZeRO stages 0 (plain data parallel), 1, 2 and 3 of `tiny`:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/zero_launch.py DATA OUT

For each stage, through the CLI as a user would: `megamed train --zero-stage S` for 2 steps
(checkpoint at step 2), then `--resume` to step 3. Stage 2 also accumulates 2 micro-batches and
stage 3 also checkpoints its transformer layers: neither may change the result.
"""
import sys

from megamed.cli import main

# the single-process reference in test_zero.py trains with the same values
COMMON = ["--size", "32", "--batch", "4", "--seed", "3", "--warmup-steps", "2", "--cond-drop", "0.5",
          "--log-every", "1", "--save-every", "2", "--keep-last", "0", "--device", "cpu", "--no-progress",
          "--no-tensorboard"]
EXTRA = {0: [], 1: [], 2: ["--grad-accum-steps", "2"], 3: ["--grad-checkpointing"]}


def run(data: str, out: str) -> None:
    for stage, extra in EXTRA.items():
        run_dir = f"{out}/zero{stage}"
        rc = main(["train", "--config", "tiny", "--data", data, "--out", run_dir, "--zero-stage", str(stage),
                   "--max-steps", "2", *COMMON, *extra])
        assert rc == 0, f"stage {stage}: first run rc={rc}"
        rc = main(["train", "--out", run_dir, "--resume", "--max-steps", "3", "--no-progress"])
        assert rc == 0, f"stage {stage}: resume rc={rc}"


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
