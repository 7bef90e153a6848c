"""Training: `train(run_dir, model_cfg, diffusion_cfg, train_cfg, data) -> dict` and its pieces.

    config.py      TrainConfig; RUN/config.json = {"model", "diffusion", "train"}
    trainer.py     the loop (AdamW + warmup, clipping, EMA, bf16 on GPU, NaN guard, SIGTERM)
    zero.py        DeepSpeed ZeRO 0-3 (+ CPU offload) for that loop: config, engine, sharded EMA,
                   ZeRO checkpoints, universal-checkpoint resume at another world size
    rng.py         every random draw keyed by (seed, step, sample) / (seed, epoch)
    checkpoint.py  RUN/checkpoints/step-N/, atomic, keep-last-K
    ema.py         EMA with power warmup
    logging.py     RUN/logs/metrics.csv + TensorBoard
"""
from __future__ import annotations

from megamed.train.config import TrainConfig, load_run_config, save_run_config
from megamed.train.trainer import NonFiniteLossError, train

__all__ = ["TrainConfig", "load_run_config", "save_run_config", "NonFiniteLossError", "train"]
