# rewards.py on CPU: closed-form values for the offline rewards, the tiny world's separation, and (below)
# the model-based rewards on tiny random models of the real transformers classes, saved and loaded by path.
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rewards as R  # noqa: E402


def _meta(src):
    return [{"source": s} for s in src]


# --- offline rewards: closed forms

def test_psnr_of_known_mse():
    x = torch.full((2, 3, 16, 16), 0.5)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :8] += 0.2  # MSE 0.04 on half the pixels = 0.02 -> 10·log10(50)
    out = R.psnr(y, ["", ""], _meta(x))
    torch.testing.assert_close(out, torch.tensor([20.0, 10 * math.log10(50)]))
    assert R.psnr(x, ["", ""], _meta(x)).eq(100).all()  # identical: floored MSE, finite


def test_ssim_identity_and_inverse():
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(R.ssim(x, ["", ""], _meta(x)), torch.ones(2))
    assert (R.ssim(1 - x, ["", ""], _meta(x)) < 0).all()  # anti-correlated structure
    with pytest.raises(ValueError, match="11x11"):
        R.ssim(torch.rand(1, 3, 8, 8), [""], _meta(torch.rand(1, 3, 8, 8)))


def test_source_is_required_and_resized():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(KeyError, match="source"):
        R.psnr(x, ["", ""], [{}, {}])
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16) * torch.linspace(1, 0.5, 16).view(1, 1, 16, 1)
    big = torch.nn.functional.interpolate(smooth.expand(2, 3, 16, 16), scale_factor=2, mode="bilinear")
    assert (R.psnr(smooth.expand(2, 3, 16, 16), ["", ""], _meta(big)) > 30).all()  # a 2x source is brought to the image's size


def test_colorfulness_closed_form():
    gray = torch.rand(1, 1, 8, 8).expand(1, 3, 8, 8)
    assert R.colorfulness(gray, [""], [{}]).item() == 0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1  # rg = 255, yb = 127.5 everywhere: σ = 0, μ term = 0.3·sqrt(255² + 127.5²)
    torch.testing.assert_close(R.colorfulness(red, [""], [{}]), torch.tensor([0.3 * math.hypot(255, 127.5)]))


def test_laplacian_closed_form():
    const = torch.full((1, 3, 9, 9), 0.3)
    assert R.laplacian_sharpness(const, [""], [{}]).item() == 0
    ramp = torch.linspace(0, 1, 9).view(1, 1, 1, 9).expand(1, 3, 9, 9)  # linear: Laplacian 0
    assert R.laplacian_sharpness(ramp, [""], [{}]).abs().item() < 1e-10
    checker = ((torch.arange(10).view(10, 1) + torch.arange(10)) % 2).float().expand(1, 3, 10, 10)
    torch.testing.assert_close(R.laplacian_sharpness(checker, [""], [{}]), torch.tensor([16.0]))  # ±4, balanced


def test_edge_density_step():
    x = torch.zeros(2, 3, 16, 16)
    x[1, :, :, 8:] = 1  # one vertical step edge: Sobel/4 gives magnitude 1 on 2 of 16 columns
    out = R.edge_density(x, ["", ""], [{}, {}])
    assert out[0] < 0.01 and abs(out[1].item() - 2 / 16) < 0.01


def test_jpeg_flat_smaller_than_noise():
    x = torch.cat([torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64)])
    kb = R.jpeg_size(x, ["", ""], [{}, {}])
    assert kb.dtype == torch.float32 and kb[0] < kb[1]
    torch.testing.assert_close(R.jpeg_compressibility(x, ["", ""], [{}, {}]), -kb)


@pytest.mark.parametrize("name", sorted(R.OFFLINE))
def test_offline_contract(name):
    images, prompts, _ = R.tiny_world(4, size=16, seed=1)
    meta = _meta(torch.rand(4, 3, 16, 16))
    for x in (images, images.bfloat16()):
        out = R.get_reward(name)(x, prompts, meta)
        assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if name not in ("jpeg", "jpeg_compressibility"):  # all others are differentiable
        x = images.clone().requires_grad_(True)
        R.get_reward(name)(x, prompts, meta).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names:.*tiny_photo"):
        R.get_reward("nope")
    with pytest.raises(ValueError, match="no options"):
        R.get_reward("tiny_photo", path_or_hub_id="x")
    assert set(R.REWARDS) == set(R.OFFLINE) | set(R.MODEL)


# --- the tiny world

def test_tiny_world_deterministic_paired_prefix():
    x, p, s = R.tiny_world(600, seed=7)
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    x2, p2, s2 = R.tiny_world(600, seed=7)
    assert torch.equal(x, x2) and p == p2 and s == s2
    assert not torch.equal(R.tiny_world(8, seed=8)[0], x[:8])
    x3, p3, _ = R.tiny_world(300, seed=7)  # chunked generators: a shorter world is a prefix
    assert torch.equal(x3, x[:300]) and p3 == p[:300]
    assert 0.4 < s.count("photo") / len(s) < 0.6
    assert all(q.split()[1] in R.COLORS and q.split()[2] in R.SHAPES for q in p)
    ph, pp, sp = R.tiny_world(50, seed=7, style="photo")
    sk, ps, ss = R.tiny_world(50, seed=7, style="sketch")
    assert pp == ps == p[:50] and set(sp) == {"photo"} and set(ss) == {"sketch"}
    photo = torch.tensor([t == "photo" for t in s[:50]])
    assert torch.equal(x[:50][photo], ph[photo]) and torch.equal(x[:50][~photo], sk[~photo])
    assert R.tiny_world(0)[0].shape == (0, 3, 32, 32) and R.tiny_world(3, size=16)[0].shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="style"):
        R.tiny_world(2, style="oil")


def test_tiny_rewards_separate_the_styles():
    ph, prompts, _ = R.tiny_world(200, seed=3, style="photo")
    sk, _, _ = R.tiny_world(200, seed=3, style="sketch")
    blend = 0.5 * ph + 0.5 * sk  # same prompt and geometry, pixel-wise halfway
    for fn, sign in ((R.tiny_photo, 1), (R.tiny_sketch, -1)):
        a, b, c = (sign * fn(x, prompts, None) for x in (ph, blend, sk))
        assert a.min() > c.max()  # AUC 1.0 between the styles
        assert ((a > b) & (b > c)).all()  # each blend sits between its photo and its sketch
    for x in (ph, sk):  # both in [0, 1]
        for fn in (R.tiny_photo, R.tiny_sketch, R.tiny_prompt):
            y = fn(x, prompts, None)
            assert 0 <= y.min() and y.max() <= 1
    assert R.tiny_photo(torch.ones(1, 3, 32, 32), [""], None) < 1e-6  # a blank page is not a photo ...
    assert R.tiny_sketch(torch.ones(1, 3, 32, 32), [""], None) < 1e-6  # ... nor a sketch


def test_tiny_prompt_prefers_the_named_color():
    ph, prompts, _ = R.tiny_world(300, seed=4, style="photo")
    scores = torch.stack([R.tiny_prompt(ph, [f"a {c} shape"] * 300, None) for c in R.COLORS], 1)  # [300,6]
    true = torch.tensor([R.COLORS.index(p.split()[1]) for p in prompts])
    assert (scores.argmax(1) == true).float().mean() > 0.95
    torch.testing.assert_close(scores[torch.arange(300), true], R.tiny_prompt(ph, prompts, None))
    sk, _, _ = R.tiny_world(50, seed=4, style="sketch")
    assert R.tiny_prompt(sk, prompts[:50], None).max() < 0.01  # gray: no hue at all
    with pytest.raises(ValueError, match="exactly one of"):
        R.tiny_prompt(ph[:1], ["a shape"], None)
