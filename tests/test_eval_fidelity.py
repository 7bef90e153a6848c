"""FID / KID / precision-recall / MS-SSIM against direct references, graded degradations,
memorisation with planted copies, and the `megamed eval fidelity|memorisation` commands."""
import argparse
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage

from megamed.data.images import write_png16
from megamed.data.layout import OBSERVATIONS, write_metadata
from megamed.eval.features import extract, get_extractor, random_conv
from megamed.eval.fidelity import (fid, frechet_distance, kid, mmd2_unbiased, ms_ssim, precision_recall, ssim_parts,
                                   within_prompt_diversity)
from megamed.eval.memorisation import memorisation_stats, nearest, pixel_vectors


def chest_like(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[n, 1, size, size] in [-1, 1]: two dark 'lungs' of random size/position on a bright body,
    a bright 'heart' blob and horizontal 'rib' stripes of random phase: structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        r = torch.rand(8, generator=g)
        img = 0.6 - 0.1 * (xx ** 2 + yy ** 2)
        for side in (-1, 1):
            cx, ry = side * (0.4 + 0.1 * r[0]), 0.5 + 0.3 * r[1]
            img = img - 1.0 * (((xx - cx) / 0.28) ** 2 + ((yy + 0.1 * r[2]) / ry) ** 2 < 1).float()
        img = img + 0.6 * torch.exp(-((xx - 0.1 * r[3]) ** 2 + (yy - 0.2) ** 2) / (0.05 + 0.1 * r[4]))
        img = img + 0.15 * torch.sin(yy * (18 + 6 * r[5]) + 6.28 * r[6])
        out.append(img.clamp(-1, 1))
    return torch.stack(out)[:, None]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


# ---- FID ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,seed", [(200, 7, 0), (53, 16, 1), (20, 30, 2)])   # last: fewer images than dims
def test_fid_matches_scipy_sqrtm(n, d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n + 3, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)   # the covariance route
    assert fid(a, a) == pytest.approx(0.0, abs=1e-7)


def test_fid_bad_input():
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid(np.full((4, 3), np.nan), np.zeros((5, 3)))


def test_fid_rises_with_graded_blur_and_noise():
    ext = random_conv(0)
    ref = extract(ext, chest_like(48, seed=1))
    fresh = chest_like(48, seed=2)                            # same distribution, other samples
    blur = [fid(ref, extract(ext, gaussian_blur(fresh, s) if s else fresh)) for s in (0, 0.7, 1.5, 3.0)]
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(fresh.shape, generator=g)
    noise = [fid(ref, extract(ext, (fresh + s * eps).clamp(-1, 1))) for s in (0, 0.05, 0.15, 0.4)]
    assert all(x < y for x, y in zip(blur, blur[1:])), blur
    assert all(x < y for x, y in zip(noise, noise[1:])), noise


# ---- KID ----------------------------------------------------------------------------------

def test_mmd2_unbiased_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(11, 5)) + 0.2
    k = lambda u, v: (u @ v / 5 + 1.0) ** 3                   # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)


def test_kid_is_zero_in_expectation_for_identical_distributions():
    rng = np.random.default_rng(1)
    same = [kid(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), subsets=5, subset_size=50)[0] for _ in range(40)]
    shifted = kid(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 0.5, subsets=5, subset_size=50)[0]
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 4 * se                        # unbiased: mean within noise of 0
    assert min(same) < 0 < max(same)                          # (a biased estimator would be > 0 always)
    assert shifted > 10 * np.std(same)


# ---- precision / recall -------------------------------------------------------------------

def _pr_brute(real, fake, k):
    def radii(x):
        return np.array([sorted(np.linalg.norm(x - p, axis=1))[k] for p in x])
    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rad for r, rad in zip(real, rr)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rad for f, rad in zip(fake, rf)) for r in real])
    return prec, rec


def test_precision_recall_matches_brute_force_and_extremes():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(23, 4)) * 0.4 + 0.6   # narrower, shifted
    p, r = precision_recall(real, fake, k=3)
    assert (p, r) == pytest.approx(_pr_brute(real, fake, 3))
    assert p > r                                              # a mode-collapsed fake: realistic, low coverage
    assert precision_recall(real, real, 3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, 3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(real[:3], fake, k=3)


# ---- MS-SSIM ------------------------------------------------------------------------------

def test_single_scale_ssim_matches_scipy_gaussian_filter():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (41, 37))
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1)
    f = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]  # noqa: E731 (11-tap valid)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ref = ((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs).mean()
    s, c = ssim_parts(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])
    assert float(s) == pytest.approx(ref, rel=1e-10)
    assert float(c) == pytest.approx(cs.mean(), rel=1e-10)


def test_ms_ssim_identical_is_one_and_falls_with_noise():
    x = chest_like(2, size=170, seed=4)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    vals = [float(ms_ssim(x, (x + s * eps).clamp(-1, 1)).mean()) for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in zip(vals, vals[1:])) and 0 <= vals[-1] < 0.5, vals
    y = (x + 0.1 * eps).clamp(-1, 1)
    assert torch.allclose(ms_ssim(x, y), ms_ssim(y, x))       # symmetric
    assert float(ms_ssim(x[0, 0], y[0, 0])) == pytest.approx(float(ms_ssim(x, y)[0]))   # [H, W] input
    with pytest.raises(ValueError, match="161"):
        ms_ssim(x[..., :160, :], x[..., :160, :])
    with pytest.raises(ValueError, match="shapes differ"):
        ms_ssim(x, x[:1])


def test_within_prompt_diversity():
    x = chest_like(3, size=161, seed=5)
    imgs = torch.cat([x[:1], x[:1], x[1:2], x[2:3], x[2:3]])  # prompt a: 2 copies; b: 2 different; c: alone
    prompts = ["a", "a", "b", "b", "c"]
    r = within_prompt_diversity(imgs, prompts)
    expect = (1.0 + float(ms_ssim(x[1:2], x[2:3]))) / 2
    assert r["prompts"] == 2 and r["pairs"] == 2
    assert r["ms_ssim"] == pytest.approx(expect)
    with pytest.raises(ValueError, match="lengths differ"):
        within_prompt_diversity(imgs, prompts[:-1])


# ---- extractors ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.jit is deprecated, the Inception files are not
def test_extractors_are_pinned_by_hash(tmp_path):
    a, b = random_conv(0), random_conv(0)
    assert a.sha256 == b.sha256 and len(a.sha256) == 64 and random_conv(1).sha256 != a.sha256
    assert "random" in a.note
    x = chest_like(3, size=45, seed=0)                        # odd size
    np.testing.assert_allclose(extract(a, x), extract(b, x, batch_size=2), rtol=1e-5, atol=1e-6)
    assert get_extractor("random-conv:1").sha256 == random_conv(1).sha256
    with pytest.raises(ValueError, match="neither"):
        get_extractor(tmp_path / "nope")

    class Net(torch.nn.Module):                               # the FID-Inception TorchScript calling convention
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            feats = x.mean((2, 3))                             # [B, 3]
            return feats if return_features else feats.sum(1, keepdim=True)
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    ext = get_extractor(path)
    f = extract(ext, x)
    assert f.shape == (3, 3)
    np.testing.assert_allclose(f[:, 0], ((x + 1) * 127.5).mean((1, 2, 3)).double().numpy(), rtol=1e-5)


# ---- memorisation -------------------------------------------------------------------------

def test_nearest_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 3))
    d, i = nearest(x, x, exclude_self=True, chunk=4)          # chunking across the diagonal
    for q in range(13):
        dist = [np.linalg.norm(x[q] - x[j]) if j != q else np.inf for j in range(13)]
        assert i[q] == int(np.argmin(dist)) and d[q] == pytest.approx(min(dist))


def test_memorisation_flags_copies_not_fresh_images():
    ref = chest_like(60, seed=10)
    copies = [3, 7, 11, 42]
    gen = torch.cat([ref[copies], chest_like(40, seed=11)])  # 4 copies, then 40 fresh draws of the same distribution
    ext = random_conv(0)
    for a, b in ((extract(ext, gen), extract(ext, ref)), (pixel_vectors(gen), pixel_vectors(ref))):
        s = memorisation_stats(a, b, quantile=0.05)
        flagged = s["distance"] < s["threshold"]
        assert flagged[:4].all() and (s["distance"][:4] < 1e-6).all()
        assert s["index"][:4].tolist() == copies
        # calibration: fresh samples are flagged about `quantile` of the time (0.05 here), copies always
        assert flagged[4:].mean() <= 0.15
        assert s["share"] == pytest.approx(flagged.mean())
        assert (s["ratio"][:4] < 1e-6).all() and np.median(s["ratio"][4:]) > 0.5
    with pytest.raises(ValueError, match="quantile"):
        memorisation_stats(a, b, quantile=1.5)


# ---- the commands, end to end on tiny folders ----------------------------------------------

def _megamed_dir(root, images, splits):
    rows = []
    for i, (img, split) in enumerate(zip(images, splits)):
        write_png16(root / "images" / f"{i:03d}.png", ((img[0] + 1) / 2).numpy())
        rows.append({"Path": f"images/{i:03d}.png", "Sex": "Unknown", "Age": "Unknown", "Frontal/Lateral": "Frontal",
                     "AP/PA": "PA", **{o: "" for o in OBSERVATIONS}, "No Finding": "1.0", "split": split,
                     "prompt": "Normal chest X-ray", "findings": {}, "params": {}})
    write_metadata(root / "metadata.csv", rows)


def _run(argv):
    from megamed.cli import eval_cmd
    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_fidelity_and_memorisation_commands(tmp_path):
    ref_imgs = chest_like(12, seed=20)
    ref = tmp_path / "ref"
    _megamed_dir(ref, ref_imgs, ["train"] * 10 + ["val"] * 2)
    gen = tmp_path / "gen"
    gen.mkdir()
    gen_imgs = torch.cat([ref_imgs[[1, 4]], ref_imgs[[10]], chest_like(3, seed=21)])   # 2 train copies, 1 val copy
    for i, img in enumerate(gen_imgs):                        # a plain folder, prompts in sidecar .txt
        write_png16(gen / f"g{i}.png", ((img[0] + 1) / 2).numpy())
        (gen / f"g{i}.txt").write_text("Normal chest X-ray")

    out = tmp_path / "out"
    assert _run(["eval", "fidelity", "--reference", str(ref), "--generated", str(gen), "--out", str(out),
                 "--size", "64", "--kid-subsets", "3"]) == 0
    r = json.loads((out / "fidelity.json").read_text())
    assert r["n_reference"] == 12 and r["n_generated"] == 6 and r["extractor_sha256"] == random_conv(0).sha256
    assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and "ms_ssim_skipped" in r
    assert "sha256" in (out / "fidelity.md").read_text()

    assert _run(["eval", "memorisation", "--reference", str(ref), "--generated", str(gen), "--out", str(out),
                 "--size", "64", "--pairs", "3"]) == 0
    m = json.loads((out / "memorisation.json").read_text())
    assert m["n_reference"] == 10                             # training split only
    flagged = {p.split("/")[-1] for p in m["flagged_both"]}
    assert {"g0.png", "g1.png"} <= flagged
    closest = [(c["generated"].split("/")[-1], c["reference"].split("/")[-1], c["feature_ratio"]) for c in m["closest"]]
    assert sorted(c[:2] for c in closest[:2]) == [("g0.png", "001.png"), ("g1.png", "004.png")]
    assert closest[0][2] < 1e-6 and closest[1][2] < 1e-6
    assert closest[2][2] > 0.05                               # the copy of a val image has no training twin
    from PIL import Image
    with Image.open(out / "memorisation_pairs.png") as im:
        assert im.size[1] > 3 * 128
