"""The contrastive alignment model: loss against a reference, the model's contracts, save/load,
and training on a tiny synthetic data set whose image pattern is a function of the prompt."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamed.data.images import write_png16
from megamed.data.layout import write_metadata
from megamed.models.align import (AlignConfig, AlignModel, clip_loss, load_align, loss_floor, retrieval_top1,
                                  save_align, train_align)
from megamed.models.config import TextEncoderConfig

PROMPTS = ["Frontal chest X-ray with cardiomegaly.", "Frontal chest X-ray with pleural effusion.",
           "Frontal chest X-ray with pneumothorax.", "Frontal chest X-ray with no finding."]


def tiny_cfg(size=32) -> AlignConfig:
    return AlignConfig(image_size=size, widths=(16, 32), embed_dim=32,
                       text=TextEncoderConfig(width=32, vocab_size=1024, max_length=24, depth=1, d_head=16, d_ff=64))


@pytest.fixture(autouse=True)
def one_thread():
    # tiny convs on a shared 2-core machine: a second intra-op thread only spins (measured 50x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from megamed.text.tokenizer import build_template_tokenizer
    return build_template_tokenizer()


def make_dataset(root, n_train=48, n_val=16, size=40, seed=0):
    """Prompt k -> a bright square in quadrant k, random brightness and noise (a 40x40 picture)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_val):
        k = i % len(PROMPTS)
        img = 0.3 + 0.05 * rng.standard_normal((size, size))
        r, c = divmod(k, 2)
        h = size // 2
        img[r * h + 4:(r + 1) * h - 4, c * h + 4:(c + 1) * h - 4] += rng.uniform(0.3, 0.5)
        path = f"images/{i:03d}.png"
        write_png16(root / path, np.clip(img, 0, 1))
        rows.append({"Path": path, "Sex": "Unknown", "Age": "Unknown", "split": "train" if i < n_train else "val",
                     "prompt": PROMPTS[k]})
    write_metadata(root, rows)
    return root


# ---- the loss ----

def test_clip_loss_matches_cross_entropy_without_duplicates():
    logits = torch.randn(7, 7, generator=torch.Generator().manual_seed(0)) * 3
    ref = (F.cross_entropy(logits, torch.arange(7)) + F.cross_entropy(logits.T, torch.arange(7))) / 2
    assert torch.allclose(clip_loss(logits), ref, atol=1e-6)


def test_clip_loss_with_duplicate_prompts_equals_spread_targets():
    # identical prompts -> identical logit columns; then plain InfoNCE equals the loss whose
    # targets are spread over every matching prompt (what clip_loss's docstring relies on)
    img = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    groups = [0, 1, 0, 2, 1]                 # items 0/2 and 1/4 share a prompt
    txt = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)[groups]
    logits = 10 * img @ txt.T
    total = 0.0
    for i in range(5):                       # reference: written out per row and per column
        pos = [j for j in range(5) if groups[j] == groups[i]]
        total += -sum(logits[i].log_softmax(0)[j] for j in pos) / len(pos)
        total += -sum(logits[:, i].log_softmax(0)[j] for j in pos) / len(pos)
    assert torch.allclose(clip_loss(logits), total / 10, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        clip_loss(torch.randn(3, 4))
    # loss_floor: the minimum of that loss, reached when each image matches only its own prompt
    perfect = 1000 * (txt @ txt.T)              # images = their text embeddings, a very sharp model
    floor = loss_floor(["a", "b", "a", "c", "b"])
    assert floor == pytest.approx(4 * np.log(2) / 5)
    assert clip_loss(perfect).item() == pytest.approx(floor, abs=1e-4)
    assert loss_floor(["a", "b", "c"]) == 0


# ---- the model ----

def test_model_embeddings_scores_and_bad_input(tokenizer):
    torch.manual_seed(0)
    model = AlignModel(tiny_cfg(), tokenizer).eval()
    images = torch.rand(3, 1, 37, 50) * 2 - 1            # awkward size: resized to 32x32 inside
    img = model.encode_image(images)
    txt = model.encode_text(PROMPTS[:3])
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = model.similarity(images, PROMPTS[:3])
    assert torch.allclose(model.score(images, PROMPTS[:3]), sim.diagonal(), atol=1e-6)
    assert torch.allclose(model.score(images, [PROMPTS[1]]), sim[:, 1], atol=1e-6)  # one prompt broadcasts
    ids, mask = tokenizer.encode(PROMPTS[:3], 24)
    assert torch.allclose(model.encode_text((ids, mask)), txt)
    # logits = exp(logit_scale) * cosine, with CLIP's initial temperature 0.07
    assert torch.allclose(model(images, PROMPTS[:3]), sim / 0.07, rtol=1e-5)
    # padding and batch company do not change a prompt's embedding
    ids_long, mask_long = tokenizer.encode(PROMPTS[:1], 24)
    assert torch.allclose(model.encode_text((ids_long, mask_long)), txt[:1], atol=1e-6)

    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        model.score(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=">= 2 images"):
        model.loss(images[:1], ids[:1], mask[:1])
    with pytest.raises(ValueError, match="no tokenizer"):
        AlignModel(tiny_cfg()).encode_text(["x"])
    with pytest.raises(ValueError, match="image_size"):
        AlignConfig(image_size=16, widths=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="text.kind"):
        AlignConfig(text=TextEncoderConfig(kind="none"))


def test_loss_trains_both_towers(tokenizer):
    torch.manual_seed(0)
    model = AlignModel(tiny_cfg(), tokenizer)
    ids, mask = tokenizer.encode(PROMPTS[:3], 24)
    images = torch.randn(3, 1, 32, 32)
    loss = model.loss(images, ids, mask)
    assert torch.allclose(loss, clip_loss(model(images, (ids, mask))))
    loss.backward()
    for p in (model.image_proj.weight, model.text_proj.weight, model.logit_scale, model.image_encoder.stem.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_save_load_roundtrip(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = AlignModel(tiny_cfg(), tokenizer).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    save_align(model, tmp_path / "m", {"note": 1})
    loaded = load_align(tmp_path / "m")
    images = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded.score(images, PROMPTS[:2]), model.score(images, PROMPTS[:2]), atol=1e-6)
    assert loaded.cfg == model.cfg and loaded.logit_scale.item() == 2.5
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"note": 1}
    with pytest.raises(FileNotFoundError, match="align train"):
        load_align(tmp_path)


# ---- training ----

def test_training_on_synthetic_data_learns_the_prompt_pattern(tmp_path):
    data = make_dataset(tmp_path / "data")
    metrics = train_align(data, tmp_path / "out", size=32, steps=30, batch_size=16, lr=3e-3, warmup=5,
                          cfg=tiny_cfg(32), device="cpu", progress=False)
    # batches of 16 over 4 prompts: the loss starts near log(16) = 2.77 and cannot go below
    # the floor, about log(4) = 1.39 (each prompt is shared by ~4 images of a batch);
    # the excess over the floor must fall by more than half
    assert metrics["loss_first"] > 2.3 and 1.0 < metrics["loss_floor_last"] < 2.0, metrics
    excess_first = metrics["loss_first"] - metrics["loss_floor_first"]
    assert metrics["loss_last"] - metrics["loss_floor_last"] < 0.5 * excess_first, metrics
    assert metrics["eval_split"] == "val" and metrics["retrieval_n_images"] == 16
    assert metrics["retrieval_n_prompts"] == 4 and metrics["retrieval_chance"] == 0.25
    assert metrics["retrieval_top1"] >= 0.75, metrics      # chance 0.25, majority 0.25
    # the saved model reproduces the retrieval number, independently re-measured
    from megamed.data.loaders import MegamedDataset
    model = load_align(tmp_path / "out")
    again = retrieval_top1(model, MegamedDataset(data, "val", 32))
    assert again["top1"] == metrics["retrieval_top1"]


def test_cli_train_and_score(tmp_path, capsys):
    from megamed.cli import main

    from megamed.utils.dataclass_json import save_json

    data = make_dataset(tmp_path / "data", n_train=8, n_val=0, size=32)  # no val split: evaluates on train
    save_json(tiny_cfg(32), tmp_path / "align.json")
    rc = main(["align", "train", "--data", str(data), "--out", str(tmp_path / "out"), "--size", "32",
               "--config", str(tmp_path / "align.json"),
               "--steps", "2", "--batch", "4", "--warmup", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and 0 <= out["retrieval_top1"] <= 1
    assert out["eval_split"] == "train" and out["retrieval_n_images"] == 8
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer").is_dir()
    rc = main(["align", "score", "--model", str(tmp_path / "out"), "--image", str(data / "images/000.png"),
               str(data / "images/001.png"), "--prompt", PROMPTS[0]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and all(-1 <= float(line.split()[0]) <= 1 for line in lines)
    assert load_align(tmp_path / "out").cfg == tiny_cfg(32)
    # bad input: the CLI prints one line naming the argument and exits 2 (no traceback)
    rc = main(["align", "train", "--data", str(data), "--out", str(tmp_path / "o2"), "--size", "32", "--batch", "1"])
    assert rc == 2 and "batch_size" in capsys.readouterr().err
