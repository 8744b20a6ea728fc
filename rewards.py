# Rewards for ParetoSlider. One signature for all of them:
#     fn(images, prompts, meta) -> scores
# images: float tensor [B,3,H,W] in [0,1]; prompts: list[str]; meta: list[dict], one per sample (e.g.
# {"source": [3,H,W]} for source-fidelity rewards); scores: float32 [B] on the images' device, higher = better.
# Offline rewards are plain functions. Model-based rewards come from load_<name>(path_or_hub_id, device,
# dtype) loaders that load the weights once and return such a function. A reward that cannot be computed
# raises; it never returns a silent zero (flow_grpo's UnifiedReward regex failure -> 0 collapsed runs).
# Combining objectives is not done here: train.py does it, in plain sight.
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _luma(x):  # [B,3,H,W] -> [B,1,H,W], ITU-R BT.601 weights
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _chroma(x):  # [B,3,H,W] -> [B,H,W]: max - min over RGB, the HSV/HSL chroma; 0 for any gray
    return x.amax(1) - x.amin(1)


def _sources(images, meta):  # stack meta[i]["source"] -> [B,3,H,W] like images
    if len(meta) != images.shape[0] or any("source" not in m for m in meta):
        raise KeyError(f"this reward needs meta[i]['source'] for each of the {images.shape[0]} images")
    src = torch.stack([torch.as_tensor(m["source"]) for m in meta]).to(images.device, torch.float32)
    if src.shape[-2:] != images.shape[-2:]:  # an edit may come back at another resolution
        src = F.interpolate(src, size=images.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    return src


# --- offline rewards (no weights): notes/rewards.md §1.5

def _sqrt0(v, eps=1e-8):  # sqrt with a finite gradient at 0 (gray images) and still exactly 0 there
    return (v + eps).sqrt() - eps**0.5


def jpeg_size(images, prompts, meta):
    # kB of the PIL JPEG at quality 95 (ddpo-pytorch's "incompressibility"; its negation is compressibility).
    # Not differentiable: a proxy for detail and noise.
    a = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    kb = []
    for im in a:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        kb.append(buf.tell() / 1000)
    return torch.tensor(kb, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images, prompts, meta):
    return -jpeg_size(images, prompts, meta)


def colorfulness(images, prompts, meta):
    # Hasler & Süsstrunk 2003, "Measuring colourfulness in natural images", on 0..255 values:
    # rg = R-G, yb = (R+G)/2 - B, M = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²). 0 for any gray image.
    r, g, b = (images.float() * 255).unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    std = _sqrt0(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
    mean = _sqrt0(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return std + 0.3 * mean


def laplacian_sharpness(images, prompts, meta):
    # Variance of the 4-neighbour Laplacian of luma (Pech-Pacheco et al. 2000), valid region only so the
    # zero padding does not invent an edge at the border.
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=images.device).view(1, 1, 3, 3)
    return F.conv2d(_luma(images.float()), k).flatten(1).var(1, unbiased=False)


def edge_density(images, prompts, meta, threshold=0.1, softness=0.02):
    # Soft fraction of pixels whose Sobel gradient magnitude (luma, /4 so a unit step edge gives 1) exceeds
    # `threshold`; a sigmoid instead of a hard threshold keeps it differentiable. In [0,1].
    gx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=images.device) / 4
    k = torch.stack([gx, gx.T]).unsqueeze(1)  # [2,1,3,3]
    g = F.conv2d(F.pad(_luma(images.float()), (1, 1, 1, 1), mode="replicate"), k)
    mag = (g.square().sum(1) + 1e-12).sqrt()
    return torch.sigmoid((mag - threshold) / softness).flatten(1).mean(1)


def psnr(images, prompts, meta):
    # dB to meta["source"] for images in [0,1]; MSE floored at 1e-10 so identical images give 100 dB, not inf.
    mse = (images.float() - _sources(images, meta)).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(images, prompts, meta):
    # Wang et al. 2004 SSIM to meta["source"]: Gaussian 11x11 window σ=1.5, K1=0.01, K2=0.03, L=1, valid
    # region, mean over channels and pixels (the reference MATLAB/skimage setting). In [-1,1], 1 = identical.
    x, y = images.float(), _sources(images, meta)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    t = torch.arange(11, device=x.device, dtype=torch.float32) - 5
    g = torch.exp(-t.square() / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(z):
        return F.conv2d(z, w, groups=3)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# --- the tiny world
# `python train.py --backbone sd35 --tiny` pretrains a tiny pixel-space model on this world and then slides
# between its two styles, mirroring the paper's photorealism <-> sketch pair (notes/paper.md §4.1).
# Each prompt "a {color} {shape}" is drawn in two styles:
#   photo  - a filled, shaded shape over a textured, muted, noisy background: colour and texture everywhere;
#   sketch - a thin dark gray outline of the same shape on near-white paper.
# The three rewards below measure exactly these properties, so they are well spread on the world and in
# conflict: tiny_photo wants chroma, texture and no white; tiny_sketch wants white paper plus a little dark
# ink; tiny_prompt wants the prompt's hue (absent from a sketch, which is gray).

COLORS = ["red", "orange", "yellow", "green", "blue", "purple"]
SHAPES = ["circle", "square", "triangle", "ring", "cross", "diamond"]
_RGB = torch.tensor([[0.85, 0.10, 0.10], [0.95, 0.50, 0.05], [0.95, 0.85, 0.10],
                     [0.10, 0.70, 0.20], [0.10, 0.25, 0.85], [0.55, 0.15, 0.70]])  # hues 0,30,54,129,229,285 deg


def _shape_distance(shape, dx, dy, r):
    # Signed distance (negative inside) to SHAPES[shape] of "radius" r centred at 0; dx, dy: [n,S,S],
    # r: [n,1,1], same units. Exact for circle and ring, a max/min of half-planes (exact near edges) else.
    ax, ay, rho = dx.abs(), dy.abs(), (dx.square() + dy.square()).sqrt()
    name = SHAPES[shape]
    if name == "circle":
        return rho - r
    if name == "square":
        return torch.maximum(ax, ay) - 0.8 * r
    if name == "triangle":  # pointing up (image y grows downward): inradius r/2, circumradius r
        c = math.sqrt(3) / 2
        return torch.maximum(torch.maximum(dy, -c * dx - 0.5 * dy), c * dx - 0.5 * dy) - 0.5 * r
    if name == "ring":
        return (rho - 0.7 * r).abs() - 0.3 * r
    if name == "cross":
        return torch.minimum(torch.maximum(ax - r, ay - 0.33 * r), torch.maximum(ax - 0.33 * r, ay - r))
    if name == "diamond":
        return (ax + ay) / math.sqrt(2) - 0.75 * r
    raise ValueError(name)


def _render(n, size, gen, style):
    # one chunk of the world: -> images [n,3,size,size], color [n], shape [n], is_photo [n]. Every random
    # number is drawn whatever the style (pairing); each style is then rendered only where it is used.
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    def up(z):  # low-res noise -> [.., size, size], smooth
        return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)

    color = torch.randint(len(COLORS), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    coin = torch.rand(n, generator=gen)  # drawn even when the style is fixed, to keep the pairing
    is_photo = coin < 0.5 if style is None else torch.full((n,), style == "photo")
    cx, cy, r = u(n, 1, 1, lo=0.35, hi=0.65), u(n, 1, 1, lo=0.35, hi=0.65), u(n, 1, 1, lo=0.2, hi=0.32)
    hue, sat, val = u(n, 1), u(n, 1, lo=0.15, hi=0.4), u(n, 1, lo=0.25, hi=0.5)
    terrain, tint, pressure = u(n, 1, 4, 4), u(n, 3, 3, 3, lo=-0.04, hi=0.04), u(n, 1, 6, 6)
    light = F.normalize(torch.randn(n, 2, generator=gen), dim=1).view(n, 2, 1, 1)
    paper, ink, width = u(n, 1, 1, 1, lo=0.9, hi=0.98), u(n, 1, 1, 1, lo=0.05, hi=0.2), u(n, 1, 1, lo=0.9, hi=1.3)
    noise = torch.randn(n, 4, size, size, generator=gen)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dx = (coords.view(1, 1, size) - cx).expand(n, size, size)
    dy = (coords.view(1, size, 1) - cy).expand(n, size, size)
    d = torch.empty(n, size, size)  # signed distance to the shape's outline, in pixels
    for j in range(len(SHAPES)):
        m = shape == j
        d[m] = _shape_distance(j, dx[m], dy[m], r[m]) * size

    images = torch.empty(n, 3, size, size)
    p = is_photo
    # photo: background = a muted random colour (chroma < 0.3, below tiny_prompt's gate) modulated by
    # low-frequency terrain and a little tint, plus mostly-luma pixel noise (texture without adding hue);
    # object = the prompt colour, lit from a random direction, with antialiased edges.
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue[p]) % 6  # HSV -> RGB, vectorised: [np,3]
    bg = (val[p] * (1 - sat[p] * torch.minimum(k, 4 - k).clamp(0, 1))).view(-1, 3, 1, 1)
    bg = bg * (0.75 + 0.5 * up(terrain[p])) + up(tint[p]) + 0.06 * noise[p, :1] + 0.015 * noise[p, 1:]
    shade = 0.85 + 0.3 * (light[p, 0] * dx[p] + light[p, 1] * dy[p]) / r[p]  # brighter towards the light
    obj = _RGB[color[p]].view(-1, 3, 1, 1) * shade.unsqueeze(1) + 0.02 * noise[p, 1:].roll(1, 1)
    alpha = torch.sigmoid(-d[p] / 0.5).unsqueeze(1)
    images[p] = alpha * obj + (1 - alpha) * bg
    # sketch: gray paper with faint grain, a pencil line of half-width 0.9..1.3 px whose pressure varies
    q = ~is_photo
    line = (1 - d[q].abs() / width[q]).clamp(0, 1).unsqueeze(1) * (0.8 + 0.2 * up(pressure[q]))
    grain = paper[q] + 0.015 * noise[q, :1].roll(1, 2)
    images[q] = (grain * (1 - line) + ink[q] * line).expand(-1, 3, size, size)
    return images.clamp(0, 1), color, shape, is_photo


def tiny_world(n, size=32, seed=0, style=None):
    # -> (images [n,3,size,size] float32 in [0,1], prompts, styles). style None: each image photo or sketch
    # with probability 1/2; "photo"/"sketch": all of one style. Rendered in whole chunks of 256 with one
    # generator per (seed, chunk), so it is deterministic, tiny_world(m) is a prefix of tiny_world(n > m),
    # and the same seed gives the same prompts and geometry in both styles (paired images).
    if style not in (None, "photo", "sketch"):
        raise ValueError(f"style must be None, 'photo' or 'sketch', got {style!r}")
    images, prompts, styles = [], [], []
    for i, start in enumerate(range(0, n, 256)):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        x, color, shape, is_photo = _render(256, size, gen, style)
        keep = min(256, n - start)
        x, color, shape, is_photo = x[:keep], color[:keep], shape[:keep], is_photo[:keep]
        images.append(x)
        prompts += [f"a {COLORS[c]} {SHAPES[s]}" for c, s in zip(color.tolist(), shape.tolist())]
        styles += ["photo" if p else "sketch" for p in is_photo.tolist()]
    return torch.cat(images) if images else torch.zeros(0, 3, size, size), prompts, styles


def _white(x):  # per-pixel soft "paper": bright (luma > ~0.7) and gray (chroma < ~0.12); [B,H,W] in (0,1)
    return torch.sigmoid((_luma(x)[:, 0] - 0.7) / 0.06) * torch.sigmoid((0.12 - _chroma(x)) / 0.04)


def _ink(x):  # per-pixel soft "pencil": dark (luma < 0.6) and gray; a ramp, so paper is exactly ink-free
    return ((0.6 - _luma(x)[:, 0]) / 0.3).clamp(0, 1) * torch.sigmoid((0.15 - _chroma(x)) / 0.03)


def tiny_photo(images, prompts, meta):
    # "photorealism" of the tiny world, in [0,1]: colour (mean chroma, saturating near 0.3) and texture
    # (fraction of pixels with high-frequency luma energy: the photo background's noise, everywhere),
    # averaged, times the fraction of non-paper pixels. A white page scores 0 whatever its strokes.
    x = images.float()
    colour = torch.tanh(_chroma(x).flatten(1).mean(1) / 0.2)
    y = _luma(x)
    hi = (y - F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
    texture = (1 - torch.exp(-hi / 0.02)).flatten(1).mean(1)
    return 0.5 * (colour + texture) * (1 - _white(x).flatten(1).mean(1))


def tiny_sketch(images, prompts, meta):
    # "sketch-ness", in [0,1]: fraction of paper pixels times the presence of dark gray ink. Ink presence
    # saturates at a few percent of the pixels (a thin outline), and every extra dark pixel costs paper, so
    # thin lines beat filled shapes and an empty page scores 0.
    x = images.float()
    strokes = 1 - torch.exp(-_ink(x).flatten(1).mean(1) / 0.015)
    return _white(x).flatten(1).mean(1) * strokes


def _opponent(rgb):  # [...,3] -> [...,2]: the (a, b) chroma plane orthogonal to gray; its angle is the hue
    r, g, b = rgb.unbind(-1)
    return torch.stack([r - 0.5 * (g + b), (math.sqrt(3) / 2) * (g - b)], -1)


def tiny_prompt(images, prompts, meta):
    # Prompt adherence, in [0,1]: soft fraction of strongly chromatic pixels (chroma > ~0.35, above the photo
    # background's) whose hue is within ~15 degrees of the colour named in the prompt, saturating around a
    # quarter of the image (a typical filled shape). Gray sketches score ~0: it conflicts with tiny_sketch.
    idx = []
    for p in prompts:
        found = [i for i, c in enumerate(COLORS) if c in p.lower().split()]
        if len(found) != 1:
            raise ValueError(f"tiny_prompt needs exactly one of {COLORS} in the prompt, got {p!r}")
        idx.append(found[0])
    x = images.float()
    target = F.normalize(_opponent(_RGB[idx].to(x.device)), dim=-1).view(-1, 2, 1, 1)  # [B,2,1,1]
    ab = _opponent(x.movedim(1, -1)).movedim(-1, 1)  # [B,2,H,W]
    cos = (ab * target).sum(1) / (ab.norm(dim=1) + 1e-6)
    hue = torch.exp((cos - 1) / 0.03)  # 1 at the exact hue, 0.01 at 24 degrees (orange vs yellow)
    gate = torch.sigmoid((_chroma(x) - 0.35) / 0.04)
    return 1 - torch.exp(-(hue * gate).flatten(1).mean(1) / 0.1)


# --- registry: train.py picks rewards by name (--rewards a,b[,c])

OFFLINE = {  # name -> reward fn
    "jpeg": jpeg_size,
    "jpeg_compressibility": jpeg_compressibility,
    "colorfulness": colorfulness,
    "sharpness": laplacian_sharpness,
    "edge_density": edge_density,
    "psnr": psnr,
    "ssim": ssim,
    "tiny_photo": tiny_photo,
    "tiny_sketch": tiny_sketch,
    "tiny_prompt": tiny_prompt,
}
MODEL = {}  # name -> load_<name>(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, ...) -> reward fn
REWARDS = {**OFFLINE, **MODEL}


def get_reward(name, device="cpu", **kw):
    # -> reward fn. Offline rewards take no options; model-based ones are loaded here (path_or_hub_id, dtype, ...).
    if name in MODEL:
        return MODEL[name](device=device, **kw)
    if name in OFFLINE:
        if kw:
            raise ValueError(f"reward {name!r} takes no options, got {sorted(kw)}")
        return OFFLINE[name]
    raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(sorted(REWARDS))}")
