"""Training: keyed randomness, EMA, resume bit-exactness, keep-last-K, NaN guard, SIGTERM, CLI.

Everything runs the `tiny` model at 32x32 for a few steps on a 6-image data set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megamed.data import layout
from megamed.data.images import read_png_text, write_png16
from megamed.train import rng
from megamed.train.checkpoint import list_checkpoints
from megamed.train.ema import ema_decay, ema_update
from megamed.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
FINDINGS = [None, "Cardiomegaly", "Pleural Effusion", "Pneumothorax"]


def make_dataset(root: Path, n: int = 6, size: int = 32) -> Path:
    """A tiny data set in megamed's layout: smooth patterns + noise, template prompts."""
    from megamed.text.prompts import prompt_from_labels

    root.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        finding = FINDINGS[i % len(FINDINGS)]
        labels = {"No Finding": 1.0} if finding is None else {finding: 1.0}
        img = 0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(4 * yy) + 0.05 * gen.standard_normal((size, size))
        path = f"images/{i:06d}.png"
        write_png16(root / path, img.clip(0, 1))
        row = {c: "" for c in layout.COLUMNS}
        row.update({"Path": path, "Sex": "Unknown", "Age": "Unknown", "Frontal/Lateral": "Frontal", "AP/PA": "PA",
                    "split": "train", "prompt": prompt_from_labels(labels)})
        row.update({k: layout.label_str(v) for k, v in labels.items()})
        rows.append(row)
    layout.write_metadata(root / "metadata.csv", rows)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def tiny_setup(data_dir, **train_kwargs):
    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config
    from megamed.train import TrainConfig

    kw = dict(data=str(data_dir), size=32, max_steps=4, batch_size=2, warmup_steps=2, save_every=2, keep_last=0,
              log_every=1, cond_drop_prob=0.5, tensorboard=False, device="cpu", seed=3)
    kw.update(train_kwargs)
    return load_model_config("tiny"), DiffusionConfig(), TrainConfig(**kw)


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- keyed randomness ---------------------------------------------------------------------

def test_noise_draws_do_not_depend_on_batch_split():
    z, drop, noise = rng.draw_training_noise(7, 5, range(4), (1, 3, 5), 0.5)
    z1, drop1, noise1 = rng.draw_training_noise(7, 5, range(0, 1), (1, 3, 5), 0.5)
    z2, drop2, noise2 = rng.draw_training_noise(7, 5, range(1, 4), (1, 3, 5), 0.5)
    assert torch.equal(z, torch.cat([z1, z2])) and torch.equal(noise, torch.cat([noise1, noise2]))
    assert torch.equal(drop, torch.cat([drop1, drop2])) and drop.dtype == torch.bool
    # sample 0 of step 5 is exactly what its own keyed generator gives
    g = torch.Generator().manual_seed(rng.derive_seed(b"sample", 7, 5, 0))
    assert torch.equal(z[0], torch.randn((), generator=g))
    # another step or seed gives other noise
    assert not torch.equal(noise, rng.draw_training_noise(7, 6, range(4), (1, 3, 5), 0.5)[2])
    assert not torch.equal(noise, rng.draw_training_noise(8, 5, range(4), (1, 3, 5), 0.5)[2])
    assert rng.draw_training_noise(0, 0, range(64), (1,), 1.0)[1].all()
    assert not rng.draw_training_noise(0, 0, range(64), (1,), 0.0)[1].any()
    with pytest.raises(ValueError, match="drop_prob"):
        rng.draw_training_noise(0, 0, range(2), (1,), 1.5)


def test_batches_cover_each_epoch_exactly_once():
    n, b = 7, 3  # awkward: batches straddle epoch boundaries
    epoch, offset, seen = 0, 0, []
    for _ in range(7):  # 21 items = 3 epochs
        idx, epoch, offset = rng.batch_at(11, n, b, epoch, offset)
        assert len(idx) == b
        seen += idx
    assert (epoch, offset) == (3, 0)
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
        assert seen[e * n:(e + 1) * n] == rng.epoch_permutation(11, e, n).tolist()
    assert seen[:n] != seen[n:2 * n]  # a new order every epoch
    assert [i for batch in rng.BatchPlan(11, n, b, 0, 0, 7) for i in batch] == seen
    # starting mid-way gives the tail of the same stream
    assert [i for batch in rng.BatchPlan(11, n, b, 1, 2, 4) for i in batch] == seen[n + 2:n + 2 + 12]
    with pytest.raises(ValueError, match="offset"):
        rng.batch_at(0, 5, 2, 0, 5)
    with pytest.raises(ValueError, match="n must be positive"):
        rng.epoch_permutation(0, 0, 0)


def test_ema_decay_and_update_match_formula():
    assert ema_decay(0, power=0.75, max_decay=0.999) == 0.0
    assert ema_decay(9, power=0.75, max_decay=0.999) == pytest.approx(1 - 10 ** -0.75)
    assert ema_decay(10 ** 9, power=0.75, max_decay=0.999) == 0.999
    with pytest.raises(ValueError, match="max_decay"):
        ema_decay(1, max_decay=1.0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.running_mean.fill_(5.0)
    ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * torch.ones(3) + 0.1 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(ema.running_mean, torch.full((3,), 5.0))  # buffers are copied


def test_checkpoints_ignore_partial_writes_and_keep_last(tmp_path):
    from megamed.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    (tmp_path / "checkpoints" / "step-9.tmp").mkdir(parents=True)  # a save killed half-way
    (tmp_path / "checkpoints" / "step-8").mkdir()                   # no state.pt: incomplete
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, ema_model=ema, optimizer=opt, scheduler=sched,
                        state={"epoch": 0, "offset": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert not (tmp_path / "checkpoints" / "step-9.tmp").exists()
    model2, ema2 = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model2, ema_model=ema2, optimizer=opt2,
                            scheduler=sched2)
    assert state["step"] == 3 and state["offset"] == 3
    assert torch.equal(model2.weight, model.weight) and torch.equal(ema2.bias, ema.bias)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    from megamed.train.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, loss=1.0 / step)
    logger.close()
    logger = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)  # checkpoint at 3, killed at 5
    logger.log(4, loss=0.5)
    with pytest.raises(ValueError, match="unknown metric"):
        logger.log(5, los=0.1)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]


def test_train_config_rejects_bad_values(tmp_path):
    from megamed.train import TrainConfig, load_run_config, save_run_config
    from megamed.train.config import resume_conflicts
    from megamed.utils.dataclass_json import ConfigError

    for field, value in [("batch_size", 0), ("lr", 0.0), ("lr", float("inf")), ("cond_drop_prob", 1.5),
                         ("ema_decay", 1.0), ("device", "tpu"), ("max_steps", -1), ("size", 2.5)]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value})
    stored = TrainConfig(lr=1e-4, max_steps=10)
    assert resume_conflicts(stored, {"max_steps": 20, "device": "cpu"}) == []
    assert "lr" in resume_conflicts(stored, {"lr": 1e-3})[0]
    from megamed.diffusion import DiffusionConfig
    from megamed.models import load_model_config

    save_run_config(tmp_path, load_model_config("tiny"), DiffusionConfig(), stored)
    assert load_run_config(tmp_path)[2] == stored
    data = json.loads((tmp_path / "config.json").read_text())
    data["train"]["lrr"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="lrr"):
        load_run_config(tmp_path)


# ---- the loop -----------------------------------------------------------------------------

def test_cli_run_then_resume_is_bit_exact(data_dir, tmp_path, capsys):
    """2 steps via the CLI, then `--resume --max-steps 4` == 4 straight steps (same weights, EMA, optimizer)."""
    from megamed.cli import main
    from megamed.models.io import from_pretrained
    from megamed.train import load_run_config, train

    run = tmp_path / "run"
    common = ["--data", str(data_dir), "--size", "32", "--batch", "2", "--seed", "3", "--warmup-steps", "2",
              "--cond-drop", "0.5", "--log-every", "1", "--device", "cpu", "--no-progress"]
    assert main(["train", "--config", "tiny", "--out", str(run), "--max-steps", "2", "--save-every", "1",
                 "--keep-last", "1", "--sample-every", "2", "--sample-steps", "2", *common]) == 0
    # keep-last-1: only the newest checkpoint survives, no temp dirs
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert not list(run.glob("**/*.tmp"))
    assert set(json.loads((run / "config.json").read_text())) == {"model", "diffusion", "train"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").iterdir())
    text = read_png_text(run / "samples" / "step-2.png")
    assert text["synthetic"] == "true" and "cardiomegaly" in text["prompts"]
    model, tok, config = from_pretrained(run / "model")
    assert "diffusion" in config and tok is not None

    # a flag that changes the computation is refused on resume, with the reason
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5", "--max-steps", "4"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--sample-every", "0",
                 "--no-progress"]) == 0
    assert "2 this run" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]  # resumed process ran exactly 2 steps

    model_cfg, diffusion_cfg, train_cfg = load_run_config(run)
    assert train_cfg.max_steps == 4
    train_cfg = dataclasses.replace(train_cfg, keep_last=0, sample_every=0)  # operational only
    straight = train(tmp_path / "straight", model_cfg, diffusion_cfg, train_cfg, progress=False)
    assert straight["steps_run"] == 4
    a, b = run / "checkpoints" / "step-4", tmp_path / "straight" / "checkpoints" / "step-4"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert oa["scheduler"] == ob["scheduler"]
    for k, st in oa["optimizer"]["state"].items():
        assert all(torch.equal(st[n], ob["optimizer"]["state"][k][n]) for n in st)
    # the weights really moved: a no-op trainer would also be "bit exact"
    mid = load_weights(tmp_path / "straight" / "checkpoints" / "step-2" / "model.safetensors")
    end = load_weights(a / "model.safetensors")
    assert any(not torch.equal(mid[k], end[k]) for k in end)
    losses = [r["loss"] for r in read_metrics(run)]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "straight")]


def test_existing_run_needs_resume(data_dir, tmp_path):
    from megamed.train import train

    model_cfg, diffusion_cfg, train_cfg = tiny_setup(data_dir, max_steps=1, save_every=1)
    train(tmp_path, model_cfg, diffusion_cfg, train_cfg, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(tmp_path, model_cfg, diffusion_cfg, train_cfg, progress=False)
    with pytest.raises(ValueError, match="size"):
        train(tmp_path / "b", model_cfg, diffusion_cfg, tiny_setup(data_dir, size=30)[2], progress=False)


def test_train_cli_bad_input_is_a_clear_error(data_dir, tmp_path, capsys):
    from megamed.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--data", str(data_dir), "--out", out]) == 2
    assert "--config" in capsys.readouterr().err
    (tmp_path / "diff.json").write_text(json.dumps({"sigma_dta": 0.5}))
    assert main(["train", "--config", "tiny", "--data", str(data_dir), "--out", out,
                 "--diffusion", str(tmp_path / "diff.json")]) == 2
    assert "sigma_dta" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--data", str(tmp_path / "nope"), "--out", out]) == 2
    assert "data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    assert main(["train", "--config", "tiny", "--data", str(data_dir), "--out", out, "--batch", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--data", str(data_dir), "--out", out, "--size", "36"]) == 2
    assert "multiple" in capsys.readouterr().err


def test_grad_checkpointing_and_workers_change_nothing(data_dir, tmp_path, monkeypatch):
    """Operational flags (resumable ones) must not change what a step computes."""
    import megamed.models.layers as layers
    from megamed.train import train

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for flag in (False, True):
        train(tmp_path / str(flag), *tiny_setup(data_dir, max_steps=2, grad_checkpointing=flag), progress=False)
        assert bool(calls) == flag
    a = load_weights(tmp_path / "False" / "checkpoints" / "step-2" / "model.safetensors")
    b = load_weights(tmp_path / "True" / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # two DataLoader worker processes load the same batches in the same order
    train(tmp_path / "workers", *tiny_setup(data_dir, max_steps=2, num_workers=2), progress=False)
    c = load_weights(tmp_path / "workers" / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_unconditional_model_and_saved_tokenizer(data_dir, tmp_path):
    """text.kind='none' trains and samples without a tokenizer; --tokenizer PATH loads a saved one."""
    from megamed.generate import load_pipeline, sample_to_dir
    from megamed.models import TextEncoderConfig
    from megamed.text.tokenizer import build_template_tokenizer
    from megamed.train import train

    model_cfg, diffusion_cfg, train_cfg = tiny_setup(data_dir, max_steps=1, sample_every=1, sample_steps=2)
    uncond = model_cfg.replace(text=TextEncoderConfig(kind="none"), cross_attention=(False,) * model_cfg.levels)
    train(tmp_path / "u", uncond, diffusion_cfg, train_cfg, progress=False)
    assert (tmp_path / "u" / "samples" / "step-1.png").is_file()
    assert not (tmp_path / "u" / "model" / "tokenizer").exists()
    pipe = load_pipeline(tmp_path / "u", "cpu")
    paths = sample_to_dir(pipe, ["ignored"], tmp_path / "s", n=2, height=32, width=32, progress=False)
    assert paths[0].read_bytes() != paths[1].read_bytes()

    build_template_tokenizer().save(tmp_path / "tok")
    cfg = dataclasses.replace(train_cfg, tokenizer=str(tmp_path / "tok"), sample_every=0)
    train(tmp_path / "t", model_cfg, diffusion_cfg, cfg, progress=False)
    assert (tmp_path / "t" / "model" / "tokenizer").is_dir()
    with pytest.raises(ValueError, match="tokenizer"):
        train(tmp_path / "x", model_cfg, diffusion_cfg, dataclasses.replace(cfg, tokenizer=str(tmp_path / "no")),
              progress=False)
    small_vocab = model_cfg.replace(text=dataclasses.replace(model_cfg.text, vocab_size=300))
    with pytest.raises(ValueError, match="vocab"):
        train(tmp_path / "y", small_vocab, diffusion_cfg, cfg, progress=False)


class NaNAt(torch.utils.data.Dataset):
    """Wraps a data set; item `bad` has a NaN pixel (a corrupt image)."""

    def __init__(self, base, bad: int):
        self.base, self.bad = base, bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if i == self.bad:
            item["image"] = item["image"].clone()
            item["image"][0, 3, 5] = float("nan")
        return item


def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    from megamed.data.loaders import MegamedDataset
    from megamed.train import NonFiniteLossError, train

    model_cfg, diffusion_cfg, train_cfg = tiny_setup(data_dir, max_steps=5, save_every=1, keep_last=0)
    # the first item of step 3's batch is corrupt
    epoch, offset = 0, 0
    for _ in range(2):
        _, epoch, offset = rng.batch_at(train_cfg.seed, 6, 2, epoch, offset)
    bad_batch, _, _ = rng.batch_at(train_cfg.seed, 6, 2, epoch, offset)
    data = NaNAt(MegamedDataset(data_dir, split="train", size=32), bad_batch[0])
    with pytest.raises(NonFiniteLossError) as err:
        train(tmp_path, model_cfg, diffusion_cfg, train_cfg, data, progress=False)
    msg = str(err.value)
    assert "step 3" in msg and str(bad_batch) in msg and f"{bad_batch[0]:06d}.png" in msg
    assert "step-2" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    weights = load_weights(tmp_path / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_sigterm_checkpoint_then_resume_in_a_new_process_is_bit_exact(data_dir, tmp_path):
    """SIGTERM -> checkpoint at a step boundary, exit 0; a fresh process resumes it for 2 more
    steps, and the result equals an uninterrupted run of the same length."""
    from megamed.train import load_run_config, train

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "megamed", "train", "--config", "tiny", "--data", str(data_dir), "--out", str(run),
           "--size", "32", "--batch", "2", "--max-steps", "100000", "--save-every", "100000", "--log-every", "1",
           "--device", "cpu", "--no-tensorboard", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                if len(read_metrics(run)) >= 1:
                    break
            except (ValueError, TypeError):  # caught a row half-written; look again
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted at step" in out
    steps = [s for s, _ in list_checkpoints(run)]
    assert len(steps) == 1 and 1 <= steps[0] < 100000
    assert steps[0] == read_metrics(run)[-1]["step"]  # checkpoint at the step boundary it stopped on
    assert json.loads((run / "checkpoints" / f"step-{steps[0]}" / "state.json").read_text())["step"] == steps[0]
    assert (run / "model" / "model.safetensors").is_file()

    k = steps[0]
    done = subprocess.run([sys.executable, "-m", "megamed", "train", "--out", str(run), "--resume",
                           "--max-steps", str(k + 2), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(2 this run)" in done.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, k + 3))
    model_cfg, diffusion_cfg, train_cfg = load_run_config(run)
    train(tmp_path / "straight", model_cfg, diffusion_cfg, train_cfg, progress=False)
    a = load_weights(run / "checkpoints" / f"step-{k + 2}" / "model.safetensors")
    b = load_weights(tmp_path / "straight" / "checkpoints" / f"step-{k + 2}" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_tiny_model_learns(tmp_path):
    """The loop actually optimises: on 4 smooth images the loss drops well below its start."""
    from megamed.train import train

    data = make_dataset(tmp_path / "data", n=4)
    model_cfg, diffusion_cfg, train_cfg = tiny_setup(data, max_steps=100, batch_size=4, lr=2e-3, warmup_steps=10,
                                                     save_every=1000, cond_drop_prob=0.1)
    result = train(tmp_path / "run", model_cfg, diffusion_cfg, train_cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert result["steps_run"] == 100 and len(losses) == 100
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, (first, last)


def test_hf_text_encoder_trains_and_samples_with_its_own_tokenizer(tmp_path, data_dir):
    """text.kind='hf': the run uses the tokenizer saved beside the local HF model (not megamed's
    BPE), exports it with the model, and sampling from the export works."""
    transformers = pytest.importorskip("transformers")
    from megamed.generate import SamplingConfig, load_pipeline, sample_images
    from megamed.text.tokenizer import HFTokenizer
    from megamed.train import train

    words = sorted({w.strip(",").lower() for r in layout.read_metadata(data_dir) for w in r["prompt"].split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "bert" / "vocab.txt"))
    tok.save_pretrained(str(tmp_path / "bert"))
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=40)).save_pretrained(tmp_path / "bert")

    model_cfg, diff_cfg, train_cfg = tiny_setup(data_dir, max_steps=2, save_every=2)
    model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(
        model_cfg.text, kind="hf", hf_path=str(tmp_path / "bert"), max_length=16))
    out = train(tmp_path / "run", model_cfg, diff_cfg, train_cfg, progress=False)
    assert out["step"] == 2 and np.isfinite(out["loss"])

    pipe = load_pipeline(tmp_path / "run", device="cpu")
    assert isinstance(pipe.tokenizer, HFTokenizer)
    ids, mask = pipe.tokenizer.encode(["Chest X-ray showing cardiomegaly"], 16)
    assert ids[0, 0].item() == tok.cls_token_id and mask.sum() < 16     # BERT's own ids, padded
    imgs = sample_images(pipe.model, pipe.diffusion, pipe.tokenizer, ["Chest X-ray showing cardiomegaly"], [0],
                         height=32, width=32, cfg=SamplingConfig(steps=2), progress=False)
    assert imgs.shape == (1, 1, 32, 32) and torch.isfinite(imgs).all()
