# Rewards for ParetoSlider. One signature for all of them:
#     fn(images, prompts, meta) -> scores
# images: float tensor [B,3,H,W] in [0,1]; prompts: list[str] (for editing: the instructions); meta: list[dict],
# one per sample (editing: {"source": [3,H',W'] in [0,1]}, optionally "source_caption" / "target_caption");
# scores: float32 [B] on the images' device, higher = better. Video rewards take videos [B,T,3,H,W] in the same
# signature; get_reward(name, video=True) wraps an image reward to score a few frames of each clip (per_frame).
# Offline rewards are plain functions. Model-based rewards come from load_<name>(path_or_hub_id, device,
# dtype) loaders that load the weights once and return such a function. A reward that cannot be computed
# raises; it never returns a silent zero (flow_grpo's UnifiedReward regex failure -> 0 collapsed runs).
# Combining objectives is not done here: train.py does it, in plain sight.
import functools
import io
import math
import os

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


# --- offline rewards (no weights)


def _sqrt0(v, eps=1e-8):
    # sqrt with a finite gradient at 0 (gray images) and exactly 0 there on every CPU: both terms are the same
    # correctly rounded sqrt of the same float (v + eps == eps when v == 0), not sqrt vs a double constant
    return (v + eps).sqrt() - v.new_tensor(eps).sqrt()


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

    blur = lambda z: F.conv2d(z, w, groups=3)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# --- the tiny world
# `python train.py --backbone sd35 --tiny` pretrains a tiny pixel-space model on this world and then slides
# between its two styles, mirroring the paper's photorealism <-> sketch pair (the paper's text-to-image experiment,
# arXiv 2604.20816). Each prompt "a {color} {shape}" is drawn in two styles, and in every pixel blend between them:
#   photo  (s = 0) - a filled, shaded shape over a textured, muted, noisy background: colour everywhere;
#   sketch (s = 1) - a thin dark gray outline of the same shape on near-white paper;
#   mixed  (0 < s < 1) - (1 - s) photo + s sketch of the same scene, a photo fading into its drawing.
# The training pair measures each style by a statistic that is linear in s along that family (mean chroma, mean
# luma), through a concave map: intermediates score *above* the chord between the pure styles (a concave front,
# tested), so linear scalarisation has an interior optimum for every w and the slider can move smoothly. The
# held-out pair (evaluation only, as the paper evaluates with scorers it did not train on) reads other
# statistics: opponent-colour spread and dark tones for photo, white-pixel area and edge presence for sketch.
# tiny_prompt wants the prompt's hue (absent from a sketch, which is gray): a third objective for M = 3.

COLORS = ["red", "orange", "yellow", "green", "blue", "purple"]
SHAPES = ["circle", "square", "triangle", "ring", "cross", "diamond"]
_RGB = torch.tensor(
    [
        [0.85, 0.10, 0.10],
        [0.95, 0.50, 0.05],
        [0.95, 0.85, 0.10],
        [0.10, 0.70, 0.20],
        [0.10, 0.25, 0.85],
        [0.55, 0.15, 0.70],
    ]
)  # hues 0,30,54,129,229,285 deg


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


STYLE_WORDS = ("photo", "mixed", "sketch")  # caption words of the prompt-rewriting baseline (train.py --method prompt)


def caption(color, shape):  # the tiny world's prompt: "a red circle", "an orange square"
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def style_word(s):
    # the caption word of a style s in [0, 1]: photo below 0.2, sketch above 0.8, mixed between
    return "photo" if s < 0.2 else "sketch" if s > 0.8 else "mixed"


def _render(n, size, gen, style, frames=1):
    # one chunk of the world: -> images [n,3,size,size] (frames > 1: videos [n,frames,3,size,size]), color [n],
    # shape [n], s [n] (0 photo ... 1 sketch), the shape's centre in each frame [n,frames,2] (x, y in [0, 1]). Every
    # random number is drawn whatever the style (pairing): the same seed gives the same scenes in every style. A
    # video's shape crosses the frame on a straight line (its motion drawn after everything else, so frame-free draws
    # are those of the still world); background, texture, paper and pencil pressure stay put, the lighting moves with
    # the shape.
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    def up(z):  # low-res noise -> [.., size, size], smooth
        return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)

    color = torch.randint(len(COLORS), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    coin, mix = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    # style None: 3/8 photos, 3/8 sketches, 1/4 blends with s ~ U(0, 1), so the base model samples intermediates
    s = (
        torch.where(coin < 0.375, 0.0, torch.where(coin < 0.75, 1.0, mix))
        if style is None
        else torch.full((n,), {"photo": 0.0, "sketch": 1.0}.get(style, style))
    )
    cx, cy, r = u(n, 1, 1, lo=0.35, hi=0.65), u(n, 1, 1, lo=0.35, hi=0.65), u(n, 1, 1, lo=0.2, hi=0.32)
    hue, sat, val = u(n, 1), u(n, 1, lo=0.15, hi=0.4), u(n, 1, lo=0.25, hi=0.5)
    terrain, tint, pressure = u(n, 1, 4, 4), u(n, 3, 3, 3, lo=-0.04, hi=0.04), u(n, 1, 6, 6)
    light = F.normalize(torch.randn(n, 2, generator=gen), dim=1).view(n, 2, 1, 1)
    paper, ink, width = u(n, 1, 1, 1, lo=0.9, hi=0.98), u(n, 1, 1, 1, lo=0.05, hi=0.2), u(n, 1, 1, lo=0.9, hi=1.3)
    noise = torch.randn(n, 4, size, size, generator=gen)
    track = [(cx, cy)]
    if frames > 1:  # left to right or back, 0.3..0.5 of the frame wide, drifting a little vertically
        way, span, drift = (
            torch.randint(2, (n, 1, 1), generator=gen) * 2 - 1,
            u(n, 1, 1, lo=0.3, hi=0.5),
            u(n, 1, 1, lo=-0.1, hi=0.1),
        )
        track = [
            (cx + way * span * (t / (frames - 1) - 0.5), cy + drift * (t / (frames - 1) - 0.5)) for t in range(frames)
        ]

    # photo: background = a muted random colour (chroma < 0.3, below tiny_prompt's gate) modulated by
    # low-frequency terrain and a little tint, plus mostly-luma pixel noise (texture without adding hue);
    # object = the prompt colour, lit from a random direction, with antialiased edges.
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * hue) % 6  # HSV -> RGB, vectorised: [n,3]
    bg = (val * (1 - sat * torch.minimum(k, 4 - k).clamp(0, 1))).view(-1, 3, 1, 1)
    bg = bg * (0.75 + 0.5 * up(terrain)) + up(tint) + 0.06 * noise[:, :1] + 0.015 * noise[:, 1:]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    out = []
    for x, y in track:
        dx = (coords.view(1, 1, size) - x).expand(n, size, size)
        dy = (coords.view(1, size, 1) - y).expand(n, size, size)
        d = torch.empty(n, size, size)  # signed distance to the shape's outline, in pixels
        for j in range(len(SHAPES)):
            m = shape == j
            d[m] = _shape_distance(j, dx[m], dy[m], r[m]) * size
        shade = 0.85 + 0.3 * (light[:, 0] * dx + light[:, 1] * dy) / r  # brighter towards the light
        obj = _RGB[color].view(-1, 3, 1, 1) * shade.unsqueeze(1) + 0.02 * noise[:, 1:]
        alpha = torch.sigmoid(-d / 0.5).unsqueeze(1)
        photo = (alpha * obj + (1 - alpha) * bg).clamp(0, 1)
        # sketch: gray paper with faint grain, a pencil line of half-width 0.9..1.3 px whose pressure varies
        line = (1 - d.abs() / width).clamp(0, 1).unsqueeze(1) * (0.8 + 0.2 * up(pressure))
        sketch = ((paper + 0.015 * noise[:, :1]) * (1 - line) + ink * line).clamp(0, 1).expand(-1, 3, size, size)
        w = s.view(-1, 1, 1, 1)
        out.append((1 - w) * photo + w * sketch)
    xy = torch.stack([torch.cat([x, y], 1).flatten(1) for x, y in track], 1)  # [n, frames, 2]
    return (out[0] if frames == 1 else torch.stack(out, 1)), color, shape, s, xy


def tiny_world(n, size=32, seed=0, style=None):
    # -> (images [n,3,size,size] float32 in [0,1], prompts "a {color} {shape}", styles: s of each image, floats in
    # [0, 1]). style None: 3/8 photos (s = 0), 3/8 sketches (s = 1), 1/4 blends (s ~ U(0, 1)); "photo", "sketch"
    # or a number s: all of that style. Rendered in whole chunks of 256 with one generator per (seed, chunk), so it
    # is deterministic, tiny_world(m) is a prefix of tiny_world(n > m), and the same seed gives the same prompts
    # and geometry in every style (paired images).
    if not (style in (None, "photo", "sketch") or (isinstance(style, (int, float)) and 0 <= style <= 1)):
        raise ValueError(f"style must be None, 'photo', 'sketch' or a number in [0, 1], got {style!r}")
    images, prompts, styles = [], [], []
    for i, start in enumerate(range(0, n, 256)):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        x, color, shape, s, _ = _render(256, size, gen, style)
        keep = min(256, n - start)
        images.append(x[:keep])
        prompts += [caption(COLORS[c], SHAPES[j]) for c, j in zip(color[:keep].tolist(), shape[:keep].tolist())]
        styles += s[:keep].tolist()
    return torch.cat(images) if images else torch.zeros(0, 3, size, size), prompts, styles


def tiny_video_world(n, size=24, frames=6, seed=0, style=None):
    # the tiny world in motion (train.py --backbone ltx2 --tiny): the same scenes, prompts and styles as tiny_world,
    # the shape crossing the frame. -> (videos [n,frames,3,size,size] in [0,1], prompts, styles, the shape's centre
    # per frame [n,frames,2]). Chunks of 256 with one generator per (seed, chunk), as tiny_world.
    if frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {frames}")
    videos, prompts, styles, tracks = [], [], [], []
    for i, start in enumerate(range(0, n, 256)):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        x, color, shape, s, xy = _render(256, size, gen, style, frames)
        keep = min(256, n - start)
        videos.append(x[:keep]), tracks.append(xy[:keep])
        prompts += [caption(COLORS[c], SHAPES[j]) for c, j in zip(color[:keep].tolist(), shape[:keep].tolist())]
        styles += s[:keep].tolist()
    return torch.cat(videos), prompts, styles, torch.cat(tracks)


def _white(x):  # per-pixel soft "paper": bright (luma > ~0.7) and gray (chroma < ~0.12); [B,H,W] in (0,1)
    return torch.sigmoid((_luma(x)[:, 0] - 0.7) / 0.06) * torch.sigmoid((0.12 - _chroma(x)) / 0.04)


def _mean(v):  # [B, ...] -> [B]
    return v.flatten(1).mean(1)


def tiny_photo(images, prompts, meta):
    # "photorealism" of the tiny world, in [0,1): colour (mean chroma) and tonal depth (1 - mean luma), through a
    # concave map. Both statistics are linear along the photo -> sketch blend (a gray sketch adds no chroma), so
    # intermediates score above the chord; a sketch still scores ~0.15 (its dark lines), never a flat 0.
    x = images.float()
    return 1 - torch.exp(-(_mean(_chroma(x)) + 0.25 * (1 - _mean(_luma(x)))) / 0.15)


@functools.lru_cache(maxsize=None)
def _ridges(j, size, sectors=8):
    # a ridge detector for SHAPES[j]'s outline at the world's 5 radii, in angular sectors: conv kernels [5*sectors,1,
    # k,k] (k = 2 half + 1), each sector's weights on the line and on a band 1.5-4 px off it (each summing to 1), and
    # how much of each weight falls inside a size x size frame at each placement [5*sectors,size,size] (0 to 1)
    c = torch.arange(-(half := math.ceil(0.34 * size) + 2), half + 1.0) / size
    dx, dy = c.expand(len(c), -1), c[:, None].expand(-1, len(c))
    d = (_shape_distance(j, dx, dy, torch.linspace(0.2, 0.32, 5).view(-1, 1, 1)) * size).abs()  # [5,k,k] px
    angle = ((torch.atan2(dy, dx) / math.pi + 1) * sectors / 2).long().clamp(max=sectors - 1)
    sector = F.one_hot(angle, sectors).movedim(-1, 0)[None]  # [1,S,k,k]
    on, off = ((v[:, None] * sector) for v in ((1 - d / 1.5).clamp(0, 1), (d - 1.5).clamp(0, 1) * (4 - d).clamp(0, 1)))
    kernels = [(k / k.sum((2, 3), keepdim=True)).flatten(0, 1)[:, None] for k in (on, off)]
    return kernels, [F.conv2d(F.pad(torch.ones(1, 1, size, size), (half,) * 4), k)[0] for k in kernels], half


def _drawn_outline(y, prompts):
    # how clearly the prompted shape's outline is drawn in y [B,H,W] (luma), [B]: over placements (centre, radius) of
    # its ridge detector, the best one's weakest sector's contrast (mean luma off the line minus on it), so the line
    # must go round the shape (strokes elsewhere, or along part of it, score low). Sectors mostly outside the frame
    # (a shape leaving a video frame) are left out, and at least 6 of 8 must be seen. A prompt naming no shape: the
    # best of all shapes.
    best, words = torch.full((len(prompts),), -1.0, device=y.device), [set(p.lower().split()) for p in prompts]
    for j, name in enumerate(SHAPES):
        m = torch.tensor([name in w or not set(SHAPES) & w for w in words], device=y.device)
        if m.any():
            kernels, seen, half = _ridges(j, y.shape[-1])
            x = F.pad(y[m, None], (half,) * 4)  # zeros outside the frame, and `seen` says how much of a sector is in
            (on, off), (s_on, s_off) = ([t.to(y.device) for t in ts] for ts in (kernels, seen))
            shown = (s_on > 0.5) & (s_off > 0.5)  # [5S, H, W]
            c = F.conv2d(x, off) / s_off.clamp_min(1e-6) - F.conv2d(x, on) / s_on.clamp_min(1e-6)
            c = torch.where(shown, c, math.inf).unflatten(1, (5, -1)).amin(2)  # [b, 5, H, W]: the weakest sector
            best[m] = torch.maximum(
                best[m], torch.where(shown.unflatten(0, (5, -1)).sum(1) >= 6, c, -1.0).amax((1, 2, 3))
            )
    return best


def tiny_sketch(images, prompts, meta):
    # "a drawing of the prompt", in [0,1): gray paper (mean of luma - chroma, linear along the blend) through a concave
    # map, times 0.7 + 0.3 x how clearly the prompted shape's outline is drawn (_drawn_outline, saturating), so paper
    # comes first and the outline on it is what wins: a blank page scores 0.63, scattered strokes 0.66, another
    # shape's outline 0.82, the world's sketch 0.89 (32 px). A photo still scores ~0.25, never a flat 0.
    x = images.float()
    y = _luma(x)[:, 0]
    paper = F.softplus(_mean(y - _chroma(x)), beta=20)  # a smooth max(., 0): a dark, saturated photo ~1e-5, not 0
    drawn = 1 - torch.exp(-_drawn_outline(y, prompts).clamp_min(0) / 0.05)
    return (1 - torch.exp(-paper / 0.4)) * (0.7 + 0.3 * drawn)


def tiny_photo_heldout(images, prompts, meta):
    # held-out "photo" (evaluation only; other statistics than tiny_photo's): the Hasler-Susstrunk colourfulness
    # (spread and mean of the opponent channels rg, yb; Proc. SPIE 5007, 2003) and the fraction of dark pixels
    x = images.float()
    r, g, b = x.unbind(1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    colourful = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-12).sqrt()
    colourful = colourful + 0.3 * (rg.mean(1).square() + yb.mean(1).square() + 1e-12).sqrt()
    dark = _mean(torch.sigmoid((0.5 - _luma(x)) / 0.05))
    return 0.5 * (1 - torch.exp(-colourful / 0.15)) + 0.5 * dark


def tiny_sketch_heldout(images, prompts, meta):
    # held-out "sketch" (evaluation only): the area of white gray paper times the presence of edges (soft count of
    # pixels with a luma step, saturating at a few percent: the outline). A blank page scores 0.
    x = images.float()
    y = _luma(x)[:, 0]
    step = 0.5 * ((y[:, 1:, 1:] - y[:, 1:, :-1]).abs() + (y[:, 1:, 1:] - y[:, :-1, 1:]).abs())  # [B,H-1,W-1]
    edges = _mean(1 - torch.exp(-step / 0.04))
    return _mean(_white(x)) * (1 - torch.exp(-edges / 0.03))


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


# --- the tiny editing world
# The editing counterpart of the tiny world, for FLUX.1 Kontext's source preservation <-> instruction adherence
# (the paper's editing experiment). A source is a photo of one shape (tiny_world's photo style, its background kept
# muted and its lighting soft so the object stands out in chroma: the rewards below find it in the source); an
# instruction asks for one change; the target is the same scene with only that change:
#   colour - "make it blue": the object repainted, same shading and noise;
#   shape  - "make it a square": same colour, centre, radius and lighting, another outline;
#   style  - "make it a sketch": tiny_world's sketch of the same outline (gray paper, a pencil line).
# tiny_preserve pulls towards the source, tiny_adhere towards the target: the editing trade-off, offline.

EDIT_INSTRUCTIONS = [f"make it {c}" for c in COLORS] + [f"make it a {s}" for s in SHAPES] + ["make it a sketch"]
# area of SHAPES[j] at radius 1, in closed form from _shape_distance: a circle; a square of half-side 0.8;
# a triangle of inradius 1/2; a ring of radii 0.4..1; a cross of two 2 x 0.66 bars; a diamond |x|+|y| <= 0.75·√2
_SHAPE_AREA = torch.tensor([math.pi, 2.56, 3 * math.sqrt(3) / 4, 0.84 * math.pi, 2 * 2 * 0.66 - 0.66**2, 2.25])


def _outline(shape, dx, dy, r):  # _shape_distance with one shape per sample: shape [n], dx, dy [n,S,S], r [n,1,1]
    d = torch.empty(dx.shape, device=dx.device)
    for j in range(len(SHAPES)):
        m = shape == j
        d[m] = _shape_distance(j, dx[m], dy[m], r[m])
    return d


def _edit_scenes(n, size, gen):
    # every random number of one chunk of the editing world, drawn in a fixed order -> dict of tensors
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    color, shape, kind = (torch.randint(k, (n,), generator=gen) for k in (len(COLORS), len(SHAPES), 3))
    new_color = (color + torch.randint(1, len(COLORS), (n,), generator=gen)) % len(COLORS)  # never the source's
    new_shape = (shape + torch.randint(1, len(SHAPES), (n,), generator=gen)) % len(SHAPES)
    return dict(
        color=color,
        shape=shape,
        kind=kind,
        new_color=new_color,
        new_shape=new_shape,
        cx=u(n, 1, 1, lo=0.38, hi=0.62),
        cy=u(n, 1, 1, lo=0.38, hi=0.62),
        r=u(n, 1, 1, lo=0.2, hi=0.3),
        hue=u(n, 1),
        sat=u(n, 1, lo=0.1, hi=0.3),
        val=u(n, 1, lo=0.25, hi=0.5),
        terrain=u(n, 1, 4, 4),
        tint=u(n, 3, 3, 3, lo=-0.02, hi=0.02),
        light=F.normalize(torch.randn(n, 2, generator=gen), dim=1).view(n, 2, 1, 1),
        paper=u(n, 1, 1, 1, lo=0.9, hi=0.98),
        ink=u(n, 1, 1, 1, lo=0.05, hi=0.2),
        width=u(n, 1, 1, lo=0.9, hi=1.3),
        pressure=u(n, 1, 6, 6),
        noise=torch.randn(n, 4, size, size, generator=gen),
    )


def _edit_grid(sc, size):  # pixel-centre offsets from each scene's centre, in pixels: dx, dy [n,S,S]
    c = torch.arange(size, dtype=torch.float32) + 0.5
    n = sc["cx"].shape[0]
    dx = (c.view(1, 1, size) - sc["cx"] * size).expand(n, size, size)
    return dx, (c.view(1, size, 1) - sc["cy"] * size).expand(n, size, size)


def _paint(sc, d, rgb, sketch):
    # scenes -> images [n,3,S,S] in [0,1], given the signed distance to the outline d [n,S,S] (pixels), the object
    # colour rgb [n,3] and the style sketch [n] (bool). _render's two styles, with the lighting a property of the
    # scene (centre and radius), so a source and its target are lit alike whatever their outlines.
    size = d.shape[-1]

    def up(z):
        return F.interpolate(z, size=(size, size), mode="bicubic", align_corners=False)

    dx, dy = _edit_grid(sc, size)
    noise = sc["noise"]
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * sc["hue"]) % 6  # HSV -> RGB of the background, chroma <= 0.19
    bg = (sc["val"] * (1 - sc["sat"] * torch.minimum(k, 4 - k).clamp(0, 1))).view(-1, 3, 1, 1)
    bg = bg * (0.75 + 0.5 * up(sc["terrain"])) + up(sc["tint"]) + 0.06 * noise[:, :1] + 0.015 * noise[:, 1:]
    shade = 0.85 + 0.2 * (sc["light"][:, 0] * dx + sc["light"][:, 1] * dy) / (sc["r"] * size)
    obj = rgb.view(-1, 3, 1, 1) * shade.unsqueeze(1) + 0.02 * noise[:, 1:]
    alpha = torch.sigmoid(-d / 0.5).unsqueeze(1)
    images = alpha * obj + (1 - alpha) * bg
    if sketch.any():
        line = (1 - d.abs() / sc["width"]).clamp(0, 1).unsqueeze(1) * (0.8 + 0.2 * up(sc["pressure"]))
        drawing = ((sc["paper"] + 0.015 * noise[:, :1]) * (1 - line) + sc["ink"] * line).expand(-1, 3, size, size)
        images = torch.where(sketch.view(-1, 1, 1, 1), drawing, images)
    return images.clamp(0, 1)


def tiny_edit_world(n, size=32, seed=0):
    # -> (sources [n,3,size,size], instructions [n] from EDIT_INSTRUCTIONS, targets [n,3,size,size]), float32 in
    # [0,1]. Colour, shape and style edits 1/3 each. Chunks of 256 with one generator per (seed, chunk), as
    # tiny_world: deterministic, and tiny_edit_world(m) is a prefix of tiny_edit_world(n > m).
    sources, instructions, targets = [], [], []
    for i, start in enumerate(range(0, n, 256)):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        sc = _edit_scenes(256, size, gen)
        dx, dy = _edit_grid(sc, size)
        kind, r = sc["kind"], sc["r"] * size
        color = torch.where(kind == 0, sc["new_color"], sc["color"])
        shape = torch.where(kind == 1, sc["new_shape"], sc["shape"])
        keep, photo = min(256, n - start), torch.zeros(256, dtype=torch.bool)
        sources.append(_paint(sc, _outline(sc["shape"], dx, dy, r), _RGB[sc["color"]], photo)[:keep])
        targets.append(_paint(sc, _outline(shape, dx, dy, r), _RGB[color], kind == 2)[:keep])
        instructions += [
            f"make it {COLORS[c]}" if k == 0 else f"make it a {SHAPES[s]}" if k == 1 else "make it a sketch"
            for k, c, s in zip(kind[:keep].tolist(), color[:keep].tolist(), shape[:keep].tolist())
        ]
    if not sources:
        return torch.zeros(0, 3, size, size), [], torch.zeros(0, 3, size, size)
    return torch.cat(sources), instructions, torch.cat(targets)


# the code each tiny world's pictures come from: train.py hashes it into its cached base's name (a change re-pretrains)
WORLD_CODE = dict(
    image=(tiny_world, _render, _shape_distance, style_word, caption),
    video=(tiny_video_world, _render, _shape_distance, style_word, caption),
    edit=(tiny_edit_world, _edit_scenes, _edit_grid, _paint, _outline, _shape_distance),
)


def _parse_edits(prompts):  # -> kind [B] (0 colour, 1 shape, 2 style), index [B] into COLORS / SHAPES (0 for style)
    parsed = []
    for p in prompts:
        if p not in EDIT_INSTRUCTIONS:
            raise ValueError(f"not a tiny edit instruction: {p!r}; valid: {EDIT_INSTRUCTIONS}")
        w = p.split()[-1]
        parsed.append((0, COLORS.index(w)) if w in COLORS else (1, SHAPES.index(w)) if w in SHAPES else (2, 0))
    return torch.tensor(parsed, dtype=torch.long).view(-1, 2).unbind(1)


def _wmean(w, v, pad=0.0):
    # weighted mean over the pixels: w, v [B,H,W] -> [B]; `pad` pixels of weight count as zeros, so that a
    # region of a pixel or two (a circle made a diamond at 24 px) adds little instead of a noisy full term
    return (w * v).flatten(1).sum(1) / (w.flatten(1).sum(1) + pad).clamp_min(1e-6)


def _edit_reference(s, kind, index):
    # what tiny_adhere compares an output with, read off the source photos s [B,3,H,W] and the instructions (kind,
    # index from _parse_edits). The object is every pixel whose chroma is above the background's (<= ~0.25 by
    # construction, the object's >= ~0.3); from it come its palette colour (the nearest hue), centre (the centroid),
    # shape and radius (the shape template of the mask's area that fits the mask best, other than the one a shape
    # edit asks for: the world never asks for the shape a source already has). Distances in pixels.
    b, _, h, w = s.shape
    palette = _RGB.to(s.device)
    mask = torch.sigmoid((_chroma(s) - 0.3) / 0.02)  # [B,H,W]
    area = mask.flatten(1).sum(1).clamp_min(1.0)
    ab = (_opponent(s.movedim(1, -1)) * mask[..., None]).sum((1, 2))  # [B,2]
    color = (F.normalize(ab, dim=-1) @ F.normalize(_opponent(palette), dim=-1).T).argmax(1)
    ys, xs = torch.arange(h, device=s.device) + 0.5, torch.arange(w, device=s.device) + 0.5
    dx = (xs.view(1, 1, w) - ((mask.sum(1) * xs).sum(1) / area).view(b, 1, 1)).expand(b, h, w)
    dy = (ys.view(1, h, 1) - ((mask.sum(2) * ys).sum(1) / area).view(b, 1, 1)).expand(b, h, w)
    radius = (area.view(b, 1) / _SHAPE_AREA.to(s.device)).sqrt()  # [B,6]: each template at the mask's area
    fill = lambda j: torch.sigmoid(-_shape_distance(j, dx, dy, radius[:, j].view(b, 1, 1)) / 0.5)  # template j's mask
    misfit = torch.stack([_mean((fill(j) - mask).abs()) for j in range(len(SHAPES))], 1)  # [B,6]
    shape = misfit.masked_fill(F.one_hot(index, len(SHAPES)).bool() & (kind == 1)[:, None], math.inf).argmin(1)
    r = radius.gather(1, shape[:, None]).view(b, 1, 1)
    d = _outline(shape, dx, dy, r)  # [B,H,W] signed distance to the source's outline
    # colour edits: the source repainted in the asked colour with its own shading (its luma / its colour's luma)
    shade = _luma(s) / _luma(palette[color].view(b, 3, 1, 1))
    repainted = (palette[torch.where(kind == 0, index, color)].view(b, 3, 1, 1) * shade).clamp(0, 1)
    # shape edits: objectness = chroma along the object's hue, 0 at the source's background, 1 on its object
    hue = F.normalize(_opponent(palette[color]), dim=-1).view(b, 1, 1, 2)
    along = (_opponent(s.movedim(1, -1)) * hue).sum(-1)
    lo = _wmean(torch.sigmoid((d - 1.5) / 0.25), along).view(b, 1, 1)
    hi = _wmean(torch.sigmoid((-d - 1.5) / 0.25), along).view(b, 1, 1)
    new, old = torch.sigmoid(-_outline(torch.where(kind == 1, index, shape), dx, dy, r) / 0.5), torch.sigmoid(-d / 0.5)
    return dict(
        kind=kind,
        inside=torch.sigmoid((-d - 1.0) / 0.25),
        repainted=repainted,
        hue=hue,
        lo=lo,
        scale=(hi - lo).clamp_min(1e-3),
        new=new,
        gained=(new - old).clamp_min(0),
        lost=(old - new).clamp_min(0),
        kept=torch.minimum(new, old),
        # style edits: the pencil line along the outline, and the paper 1.5-3.5 px away from it
        line=(1 - d.abs() / 1.1).clamp(0, 1),
        near=torch.sigmoid((d.abs() - 1.5) / 0.25) * torch.sigmoid((3.5 - d.abs()) / 0.25),
    )


def _edit_distance(z, ref):
    # [B] distance of the images z [B,3,H,W] to what each instruction asks of its source (ref = _edit_reference);
    # z=None: of the target as the reward predicts it. Every term is a norm, hinge or clamp of an affine map of z,
    # so the distance is convex in z:
    #   colour - mean |z - the repainted source| inside the object (1 px in from its outline);
    #   shape  - 1 - mean of min(objectness, 1) where the new outline adds area, and where both outlines have the
    #            object (it must stay), + mean of max(objectness, 0) where the new outline removes area;
    #   style  - paper: mean shortfall of luma below 0.9 off the line; line: 1 - (luma of the paper 1.5-3.5 px
    #            away - luma on the outline), one minus its contrast; gray: mean chroma.
    if z is None:  # the repainted source, the new outline filled, the template sketch (paper 0.94, a 0.2 line)
        zero = ref["lo"].new_zeros(ref["kind"].shape)
        colour, o, luma, chroma = zero, ref["new"], 0.94 - 0.74 * ref["line"], zero
    else:
        z = z.float()
        colour = _wmean(ref["inside"], (z - ref["repainted"]).abs().mean(1))
        o = ((_opponent(z.movedim(1, -1)) * ref["hue"]).sum(-1) - ref["lo"]) / ref["scale"]
        luma, chroma = _luma(z)[:, 0], _chroma(z).flatten(1).mean(1)
    outline = _wmean(ref["gained"], 1 - o.clamp(max=1), pad=1.0) + _wmean(ref["lost"], o.clamp(min=0), pad=1.0)
    outline = outline + _wmean(ref["kept"], 1 - o.clamp(max=1))
    line = ref["line"]
    sketch = _wmean(1 - line, (0.9 - luma).clamp_min(0)) + 1 - (_wmean(ref["near"], luma) - _wmean(line, luma)) + chroma
    return torch.where(ref["kind"] == 0, colour, torch.where(ref["kind"] == 1, outline, sketch))


def tiny_preserve(images, prompts, meta):
    # how much of meta["source"] survives, <= 1 (1 = the source itself): 1 - mean |x - s| over pixels and channels
    # - mean |∂L(x) - ∂L(s)| over both forward differences of luma (edges and texture: structure). Both are
    # norms of x - s, so the score falls exactly linearly along a pixel blend from the source to anything.
    x, s = images.float(), _sources(images, meta)
    e = _luma(x - s)[:, 0]
    grad = 0.5 * (_mean((e[:, 1:] - e[:, :-1]).abs()) + _mean((e[:, :, 1:] - e[:, :, :-1]).abs()))
    return 1 - _mean((x - s).abs()) - grad


def tiny_adhere(images, prompts, meta):
    # how well images follow prompts[i] (an EDIT_INSTRUCTIONS entry) on meta[i]["source"] (a tiny_edit_world
    # source): (D(source) - D(x)) / (D(source) - D(predicted target)) with D = _edit_distance. 0 for the source, ~1
    # for the target (32 px, 8k triples: mean 0.94, min 0.64), continuous and unbounded below; concave along any
    # pixel blend, so with tiny_preserve (linear there) a partial edit never sits under the chord between source
    # and target. The denominator is floored at 0.05 (the 32-px world's smallest is 0.11) so that a source the
    # reward misreads cannot blow the score up. Meant for 32 px; from 24 px on, rare shape edits are misread.
    if len(prompts) != images.shape[0]:
        raise ValueError(f"tiny_adhere: {images.shape[0]} images but {len(prompts)} instructions")
    kind, index = _parse_edits(prompts)
    s = _sources(images, meta)
    ref = _edit_reference(s, kind.to(s.device), index.to(s.device))
    d0, d1 = _edit_distance(s, ref), _edit_distance(None, ref)
    return (d0 - _edit_distance(images, ref)) / (d0 - d1).clamp_min(0.05)


# --- model-based rewards, through transformers only
# Each load_<name>(path_or_hub_id=None, device, dtype, ...) loads once (lazily: only when asked for) and returns
# a reward fn. Preprocessing is done on tensors (resize, crop, normalise in torch), so a batch goes through in
# one call and, with differentiable=True, gradients reach the images (ReFL/DRaFT-style use); otherwise no-grad.
# Weights are frozen either way. transformers 5 returns output objects from get_image/text_features (§0.2).

PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore ships no tokenizer
CLIP_L = "openai/clip-vit-large-patch14"
DINOV2 = "facebook/dinov2-base"
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
PHOTO_PREFIX = "A photorealistic, high quality, 4K, camera-captured snapshot of "  # ParetoSlider pickscore_photorealism
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # also Qwen2-VL's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _load(cls, path, **kw):
    # from_pretrained with errors that say what is missing: a path that is neither a folder nor an "org/name"
    # hub id fails here, at load time, and a hub id that cannot be fetched (no network) says how to fix it.
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"{cls.__name__}: {path!r} is not a folder (nor a hub id 'org/name')")
    try:
        return cls.from_pretrained(path, **kw)
    except OSError as e:
        raise OSError(
            f"could not load {cls.__name__} from {path!r}; without network, run "
            f"`huggingface-cli download {path}` once where there is and pass the local folder ({e})"
        ) from e


LOADED = []  # the models of the reward being loaded (get_reward gives them to it as fn.modules)


def _model(cls, path, device, dtype):
    LOADED.append(_load(cls, path, dtype=dtype).to(device).eval().requires_grad_(False))
    return LOADED[-1]


def _resize_crop(x, size, short=None):
    # torch equivalent of the CLIP/DINO image processors: shortest side -> `short` (bicubic, antialiased), centre
    # crop size x size. Mean |difference| to transformers' PIL CLIPImageProcessor ~3e-3 of the [0,1] range
    # (tested); imscore reports ±0.1 PickScore from such resampling differences.
    h, w = x.shape[-2:]
    s = (short or size) / min(h, w)
    hw = (max(size, round(h * s)), max(size, round(w * s)))
    x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def _normalize(x, mean, std):
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def _emb(o):  # transformers 5: BaseModelOutputWithPooling whose pooler_output is the projected embedding
    return o.pooler_output if hasattr(o, "pooler_output") else o


def _clip(path, device, dtype, tokenizer=None):
    # -> (image_embed fn, text_embed fn, model), both embeds L2-normalised [B,D]
    from transformers import AutoTokenizer, CLIPModel

    model = _model(CLIPModel, path, device, dtype)
    if tokenizer is None:  # a folder that has its own tokenizer uses it; PickScore's hub repo has none
        local = os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer_config.json"))
        tokenizer = path if local or path != PICKSCORE else PICKSCORE_PROCESSOR
    tok = _load(AutoTokenizer, tokenizer)
    size = model.config.vision_config.image_size

    def image_embed(images):
        x = _normalize(_resize_crop(images.to(device, torch.float32), size), CLIP_MEAN, CLIP_STD)
        return F.normalize(_emb(model.get_image_features(pixel_values=x.to(dtype))).float(), dim=-1)

    def text_embed(texts):
        max_len = model.config.text_config.max_position_embeddings
        t = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        e = _emb(model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask))
        return F.normalize(e.float(), dim=-1)

    return image_embed, text_embed, model


def load_pickscore(
    path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, tokenizer=None, prefix="", differentiable=False
):
    # PickScore (Kirstain et al. 2023): logit_scale.exp()·cos(image, prompt), divided by 26 as in flow_grpo's
    # pickscore_scorer.py, so typical scores are ~0.7-0.9.
    image_embed, text_embed, model = _clip(path_or_hub_id or PICKSCORE, device, dtype, tokenizer)

    def pickscore(images, prompts, meta):
        with torch.enable_grad() if differentiable else torch.no_grad():
            cos = (image_embed(images) * text_embed([prefix + p for p in prompts])).sum(-1)
            return (model.logit_scale.exp().float() * cos / 26).to(images.device)

    return pickscore


def load_pickscore_photo(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    # the paper's photorealism reward: PickScore of the prompt behind a "photorealistic ..." prefix (its T2I code)
    return load_pickscore(path_or_hub_id, device, dtype, prefix=PHOTO_PREFIX, **kw)


def load_clipscore(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, tokenizer=None, differentiable=False):
    # CLIPScore as in DiffusionNFT's clip_scorer.py: cosine of CLIP ViT-L/14 image and text embeddings, in [-1,1]
    image_embed, text_embed, _ = _clip(path_or_hub_id or CLIP_L, device, dtype, tokenizer)

    def clipscore(images, prompts, meta):
        with torch.enable_grad() if differentiable else torch.no_grad():
            return (image_embed(images) * text_embed(list(prompts))).sum(-1).to(images.device)

    return clipscore


def load_clip_image_sim(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, tokenizer=None, differentiable=False):
    # CLIP-I source fidelity for editing (flow_grpo image_similarity): cosine of image embeddings to meta["source"]
    image_embed, _, _ = _clip(path_or_hub_id or CLIP_L, device, dtype, tokenizer)

    def clip_image_sim(images, prompts, meta):
        src = _sources(images, meta)
        with torch.enable_grad() if differentiable else torch.no_grad():
            return (image_embed(images) * image_embed(src)).sum(-1).to(images.device)

    return clip_image_sim


NEUTRAL_CAPTION = "a photo"  # the text a CLIP direction starts from when meta has no "source_caption"


def load_clip_direction(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, tokenizer=None, differentiable=False):
    # Editing adherence: CLIP directional similarity (Gal et al. 2022, StyleGAN-NADA; InstructPix2Pix's "CLIP
    # direction similarity"), the cosine between the change of the image and the change of the text,
    #     cos(E_I(output) - E_I(source), E_T(to) - E_T(from)),
    # E_I, E_T the L2-normalised CLIP ViT-L/14 image and text embeddings, source = meta["source"], to = the prompt
    # (the instruction) or meta["target_caption"] where given, from = meta["source_caption"] or NEUTRAL_CAPTION.
    # In [-1,1]; 0 for an output equal to its source (no change has no direction: cosine_similarity's eps), and
    # exactly -1 times itself when output and source swap. Output and source go through separate forwards, so
    # an unchanged image gives exactly the same embedding, not a batch-dependent rounding of it. (Near an
    # unchanged output the direction, and with differentiable=True the gradient, is dominated by tiny changes.)
    image_embed, text_embed, _ = _clip(path_or_hub_id or CLIP_L, device, dtype, tokenizer)

    def clip_direction(images, prompts, meta):
        src = _sources(images, meta)
        to = [m.get("target_caption", p) for m, p in zip(meta, prompts)]
        start = [m.get("source_caption", NEUTRAL_CAPTION) for m in meta]
        with torch.enable_grad() if differentiable else torch.no_grad():
            di = image_embed(images) - image_embed(src)
            dt = text_embed(to) - text_embed(start)
            return F.cosine_similarity(di, dt, dim=-1, eps=1e-8).to(images.device)

    return clip_direction


def load_aesthetic(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, clip=CLIP_L, differentiable=False):
    # LAION improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor, file
    # sac+logos+ava1-l14-linearMSE.pth; ddpo-pytorch and flow_grpo ship it in their assets/): an MLP
    # 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts between the first four, no activations), state-dict keys
    # layers.{0,2,4,6,7}.{weight,bias}, on L2-normalised CLIP ViT-L/14 image embeddings. Scores ~1-10.
    if path_or_hub_id is None:
        raise ValueError(
            "load_aesthetic needs the path of the LAION aesthetic head (.pth or .safetensors), "
            "e.g. sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor"
        )
    if not os.path.isfile(path_or_hub_id):
        raise FileNotFoundError(f"no aesthetic head file at {path_or_hub_id!r}")
    if path_or_hub_id.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path_or_hub_id)
    else:
        sd = torch.load(path_or_hub_id, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("layers."): v for k, v in sd.items()}
    dim = sd["0.weight"].shape[1] if "0.weight" in sd else 768
    L, D = torch.nn.Linear, torch.nn.Dropout
    head = torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1), L(64, 16), L(16, 1))
    head.load_state_dict(sd)  # strict: a wrong file fails here, naming the keys
    head = head.to(device).eval().requires_grad_(False)
    LOADED.append(head)
    image_embed, _, model = _clip(clip, device, dtype)
    if model.config.projection_dim != dim:
        raise ValueError(f"aesthetic head takes {dim}-d embeddings, CLIP {clip!r} gives {model.config.projection_dim}")

    def aesthetic(images, prompts, meta):
        with torch.enable_grad() if differentiable else torch.no_grad():
            return head(image_embed(images))[:, 0].to(images.device)

    return aesthetic


def load_dino_sim(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, differentiable=False):
    # DINO image similarity to meta["source"]: cosine of CLS tokens (VBench subject_consistency), any
    # AutoModel with a CLS token first (Dinov2Model, ViTModel for facebook/dino-vit*16). Their processor:
    # shortest side 256, centre crop 224, ImageNet mean/std.
    from transformers import AutoModel

    model = _model(AutoModel, path_or_hub_id or DINOV2, device, dtype)

    def embed(x):
        x = _normalize(_resize_crop(x.to(device, torch.float32), 224, short=256), IMAGENET_MEAN, IMAGENET_STD)
        return F.normalize(model(pixel_values=x.to(dtype)).last_hidden_state[:, 0].float(), dim=-1)

    def dino_sim(images, prompts, meta):
        src = _sources(images, meta)
        with torch.enable_grad() if differentiable else torch.no_grad():
            return (embed(images) * embed(src)).sum(-1).to(images.device)

    return dino_sim


# --- VLM judge: Qwen2.5-VL reads a rubric and the image; the score is the expected digit of its answer.
# ParetoSlider's reward server asks Qwen2.5-VL-7B for one digit 0-5 (temperature 0, max_tokens 1) and takes
# Σ k·p(k)/5 over the top-20 first-token log-probs renormalised over the digits (the released T2I code's VLM reward).
# We do the same with one forward pass and the exact probabilities of all six digits: no generation, no parsing,
# nothing that can fail into a silent zero. The rubric wording is ours, after the paper's description.

SKETCH_RUBRIC = (
    'Caption: "A sketch of {prompt}. White background. Line-art style."\n'
    "How well does the image match the caption? Check the style: drawn with lines like a pencil sketch; "
    "plain white background, no scenery; black and white, no colour; no realistic shading, lighting or "
    "textures. Check the content: the subject of the caption is there, complete and recognisable.\n"
    "Score from 0 (neither style nor content) to 5 (a clean line-art sketch of exactly the caption). "
    "Answer with one digit."
)
PHOTO_RUBRIC = (
    'Caption: "A photorealistic photo of {prompt}."\n'
    "How well does the image match the caption? Check the style: looks captured by a real camera; natural "
    "lighting and shadows; realistic materials and textures; not a drawing, painting, cartoon, 3D render or "
    "line art. Check the content: the subject of the caption is there, complete and recognisable.\n"
    "Score from 0 (neither style nor content) to 5 (a real photograph of exactly the caption). "
    "Answer with one digit."
)


# The editing pair (the paper's editing experiment): ParetoSlider's multi_reward_server.py asks Qwen2.5-VL-7B, with its
# SCORE_LOGIT template (reward_server/prompt_template.py: "Here are two images: the original and the edited
# version", the reference first, the edit second, a 0-5 digit), once with the requirement "Ignore the
# instruction! Score only if the output is exactly the same as the reference image!" (preservation) and once
# with "follow the instructions strictly" (instruction following). The wording below is ours, after those.
PRESERVE_RUBRIC = (
    "Here are two images: the original (first) and the edited version (second).\n"
    'Edit instruction: "{prompt}"\n'
    "Ignore the instruction. Is the edited image the same image as the original? Check: the same subject and "
    "identity, the same composition, pose and background, the same colours, lighting, style and details.\n"
    "Score from 0 (a different image) to 5 (exactly the same image). Answer with one digit."
)
EDIT_RUBRIC = (
    "Here are two images: the original (first) and the edited version (second).\n"
    'Edit instruction: "{prompt}"\n'
    "Does the edited image apply the instruction to the original? Judge only the instruction following: the "
    "requested change is made, complete and correct, where it was asked for. Do not judge what else changed.\n"
    "Score from 0 (no change, or the wrong change) to 5 (the instruction perfectly followed). Answer with one digit."
)


def digit_expectation(logits, digit_ids):
    # logits [B,V] at the answer position -> Σ_k k·p(k) / K-1 in [0,1], with p the softmax over the K digit
    # tokens only (= the full softmax renormalised over the digits)
    p = logits[:, digit_ids].float().softmax(-1)
    return (p * torch.arange(len(digit_ids), device=p.device)).sum(-1) / (len(digit_ids) - 1)


def qwen_patches(x, patch=14, merge=2, temporal=2):
    # [B,3,H,W] normalised, H and W multiples of patch·merge -> pixel_values [B·(H/patch)·(W/patch), 3·temporal·patch²],
    # the flattening of transformers' Qwen2VLImageProcessor: a still image is repeated `temporal` times, and
    # patches are ordered by merge window (the 2x2 patches that become one LLM token are consecutive).
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [b, gh/m, gw/m, m, m, c, temporal, patch, patch]
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def qwen_inputs(tok, config, images, prompts, rubric, image_size=448):
    # -> model kwargs for one batch. images [B,3,H,W], or [B,N,3,H,W]: N images per prompt, shown in that order
    # (the editing judges: source, then output). Qwen's ChatML with its default system prompt and the images
    # before the question, as its chat template writes a user turn [image, ..., text], written out rather than
    # taken from a processor: Qwen2_5_VLProcessor builds a video processor that needs torchvision, and its PIL
    # image path is neither batched nor differentiable. Images are resized (aspect kept) to about image_size²
    # pixels in multiples of patch·merge (Qwen's smart_resize, simplified).
    if images.dim() == 4:
        images = images.unsqueeze(1)
    if images.dim() != 5 or images.shape[0] != len(prompts) or images.shape[2] != 3:
        raise ValueError(
            f"qwen_inputs: images must be [B,3,H,W] or [B,N,3,H,W] for the {len(prompts)} prompts, "
            f"got {tuple(images.shape)}"
        )
    b, n, _, h, w = images.shape
    vc = config.vision_config
    patch, merge, unit = vc.patch_size, vc.spatial_merge_size, vc.patch_size * vc.spatial_merge_size
    scale = image_size / math.sqrt(h * w)
    rh, rw = max(unit, round(h * scale / unit) * unit), max(unit, round(w * scale / unit) * unit)
    # [B·N,3,rh,rw], each prompt's images consecutive: the order in which Qwen fills the batch's image tokens
    x = F.interpolate(images.flatten(0, 1).float(), size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
    pixels = qwen_patches(_normalize(x.clamp(0, 1), CLIP_MEAN, CLIP_STD), patch, merge, vc.temporal_patch_size)
    name = tok.convert_ids_to_tokens
    n_tokens = (rh // patch) * (rw // patch) // merge**2  # one LLM token per merge x merge patches
    one = name(config.vision_start_token_id) + name(config.image_token_id) * n_tokens + name(config.vision_end_token_id)
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + one * n
    texts = [head + rubric.format(prompt=p) + "<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    # left padding: the answer position is the last one in every row
    t = tok(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    found = (t.input_ids == config.image_token_id).sum(1)
    if (found != n * n_tokens).any():  # else Qwen fails later with "image features and image tokens do not match"
        raise ValueError(
            f"qwen_inputs: expected {n}x{n_tokens} image tokens per prompt, the tokenizer gave "
            f"{found.tolist()}; is {name(config.image_token_id)!r} one special token of it?"
        )
    grid = torch.tensor([[1, rh // patch, rw // patch]] * (b * n))
    return dict(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=pixels, image_grid_thw=grid)


def load_vlm_judge(
    path_or_hub_id=None,
    device="cpu",
    dtype=torch.bfloat16,
    rubric=SKETCH_RUBRIC,
    image_size=448,
    with_source=False,
    differentiable=False,
):
    # rubric: a str.format template with {prompt}; image_size: judge at about image_size² pixels (448: 256 tokens
    # per image); with_source: show meta[i]["source"] first and the image second, in one prompt (editing)
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = path_or_hub_id or QWEN_VL
    model = _model(Qwen2_5_VLForConditionalGeneration, path, device, dtype)
    tok = _load(AutoTokenizer, path)
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(6)]
    for k, i in enumerate(digits):  # each digit must be one token of its own, or the expectation is meaningless
        if tok.encode(str(k), add_special_tokens=False) != [i]:
            raise ValueError(f"tokenizer of {path!r} does not encode {k!r} as the single token {i}")

    def vlm_judge(images, prompts, meta):
        if with_source:  # [B,2,3,H,W]: the source (resized to the image's size), then the image
            images = torch.stack([_sources(images, meta), images.float()], 1)
        inputs = qwen_inputs(tok, model.config, images, prompts, rubric, image_size)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.enable_grad() if differentiable else torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # [B,V] at the answer position
            return digit_expectation(logits, digits).to(images.device)

    return vlm_judge


def load_vlm_sketch(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    # the paper's sketch reward (qwen_style_sketch), the partner of pickscore_photo
    return load_vlm_judge(path_or_hub_id, device, dtype, rubric=SKETCH_RUBRIC, **kw)


def load_vlm_photo(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    return load_vlm_judge(path_or_hub_id, device, dtype, rubric=PHOTO_RUBRIC, **kw)


def load_vlm_preserve(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    # editing, source preservation: is the output (second image) the source (first), instruction ignored
    return load_vlm_judge(path_or_hub_id, device, dtype, rubric=PRESERVE_RUBRIC, with_source=True, **kw)


def load_vlm_edit(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    # editing, instruction adherence: does the output (second image) apply prompts[i] to the source (first)
    return load_vlm_judge(path_or_hub_id, device, dtype, rubric=EDIT_RUBRIC, with_source=True, **kw)


# --- video objectives
# A video backbone (LTX-2) hands its rewards video [B,T,3,H,W] in [0,1], frames along dim 1, with the same prompts
# and meta; a video reward returns [B] like any other and carries `.video = True`. The paper's video sliders are
# photorealistic <-> animation and photorealistic <-> sketch (the project page's video sliders; how it scored videos is
# not published). Three ways to score a video: an image reward averaged over a few frames (per_frame: what
# get_reward(..., video=True) does to every image reward, so train.py calls each objective the same way), a VLM
# judge that sees several frames at once in one image (frame_grid), and one that needs no weights and looks
# only at time (temporal_flicker).


def _check_video(video, who):
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{who} scores videos [B,T,3,H,W], got {tuple(video.shape)}")


def frame_indices(t, frames):
    # `frames` evenly spaced frames of a t-frame video, the first and the last among them; all of them if t <= frames.
    # For t > frames the spacing (t-1)/(frames-1) exceeds 1, so rounding never picks a frame twice.
    if frames < 2:
        raise ValueError(f"sample at least 2 frames (the first and the last), got {frames}")
    if t <= frames:
        return list(range(t))
    return [round(i * (t - 1) / (frames - 1)) for i in range(frames)]


def per_frame(fn, frames=4):
    # image reward fn -> video reward: the mean of fn over frame_indices(T, frames), all B·k frames in ONE call of fn
    # (one batch through a reward model, not k), each frame with its video's prompt and meta
    if getattr(fn, "video", False):
        raise ValueError(f"{fn.__name__} already scores videos")

    def video_reward(video, prompts, meta):
        _check_video(video, f"per_frame({fn.__name__})")
        idx = frame_indices(video.shape[1], frames)
        k = len(idx)
        x = video[:, idx].flatten(0, 1)  # [B·k,3,H,W], each video's frames consecutive
        repeat = lambda items: [v for v in items for _ in range(k)]  # [B] -> [B·k] in the order of x
        scores = fn(x, repeat(prompts), None if meta is None else repeat(meta))
        return scores.reshape(video.shape[0], k).mean(1)

    video_reward.__name__ = fn.__name__
    video_reward.video = True
    return video_reward


def frame_grid(fn, frames=4):
    # image reward fn -> video reward that scores ONE image per video: frame_indices(T, frames) tiled in reading
    # order (frames=4: a 2x2 grid, first frame top left, last bottom right). A judge that sees the frames together
    # can tell a consistent style from one that drifts, at the cost of one image. The grid keeps every frame at
    # full size (2H x 2W for 4 frames), not resized back to H x W: the VLM judge resizes whatever it is given to
    # about image_size² pixels anyway, so shrinking first would only resample twice; each frame then gets a quarter
    # of the judge's tokens (raise image_size to give it more). Cells past the last frame (3 frames in a 2x2 grid)
    # repeat the last frame: a blank cell would read as "white background" to the sketch judge.
    def video_reward(video, prompts, meta):
        _check_video(video, f"frame_grid({fn.__name__})")
        b, _, c, h, w = video.shape
        idx = frame_indices(video.shape[1], frames)
        cols = math.ceil(math.sqrt(len(idx)))
        rows = math.ceil(len(idx) / cols)
        idx = idx + idx[-1:] * (rows * cols - len(idx))
        x = video[:, idx].reshape(b, rows, cols, c, h, w)
        x = x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, rows * h, cols * w)  # [B,3,rows·H,cols·W]: row-major tiles
        return fn(x, prompts, meta)

    video_reward.__name__ = fn.__name__
    video_reward.video = True
    return video_reward


def temporal_flicker(video, prompts, meta, radius=3, block=4, scale=0.05, size=64):
    # Temporal stability in (0, 1], 1 = no flicker: exp(-v / scale), v = the mean absolute second temporal difference
    # of luma along the best constant-velocity path,
    #     v = mean_t mean_blocks min_|d|<=radius mean_block |y_{t+1}(p + d) - 2·y_t(p) + y_{t-1}(p - d)|.
    # The second difference is what a frame has that is not the average of its two neighbours: 0 for a still scene
    # and for a steady fade, large for a frame brighter, noisier or other than both. Searching a shift d per
    # block x block patch (an integer motion of up to `radius` px per frame, symmetric in time) makes it ~0 for
    # whatever moves at a constant speed, too. Why not simpler: VBench's temporal_flickering scores |y_{t+1} - y_t|,
    # which punishes all motion and so rewards a frozen video; the plain second difference still punishes motion
    # faster than an edge is wide, a thin pencil line most: on tiny_video_world's moving sketches (24 px, 6 frames)
    # it is 85% of its value on the same frames shuffled, the motion-searched one 31%. Judged on luma thumbnails
    # with a short side of at most `size` px, so the search costs (2·radius+1)² shifts of a small frame and the
    # radius is a fraction of the frame (3 px of 64: ~5% of the frame per frame). scale: a random brightness jitter
    # of 5% from frame to frame (v ≈ 0.05 on mid-gray) scores ~1/e. Needs 3 frames.
    _check_video(video, "temporal_flicker")
    b, t, _, h, w = video.shape
    if t < 3:
        raise ValueError(f"temporal_flicker needs at least 3 frames, got {t}")
    y = _luma(video.float().flatten(0, 1))  # [B·T,1,H,W]
    if min(h, w) > size:
        y = F.interpolate(y, scale_factor=size / min(h, w), mode="area")
    h, w = y.shape[-2:]
    r = radius
    padded = F.pad(y, (r, r, r, r), mode="replicate").view(b, t, h + 2 * r, w + 2 * r)
    y = y.view(b, t, h, w)
    best = None
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            after = padded[:, 2:, r + dy : r + dy + h, r + dx : r + dx + w]  # y_{t+1}(p + d)
            before = padded[:, :-2, r - dy : r - dy + h, r - dx : r - dx + w]  # y_{t-1}(p - d)
            err = (after - 2 * y[:, 1:-1] + before).abs().view(b * (t - 2), 1, h, w)
            err = F.avg_pool2d(err, block, ceil_mode=True).view(b, t - 2, -1)  # per block; ceil: edge blocks count
            best = err if best is None else torch.minimum(best, err)
    return torch.exp(-best.flatten(1).mean(1) / scale)


temporal_flicker.video = True


# The paper's photorealistic <-> animation slider shows Pixar-like clips (cat_pixar.mp4 on the project page); its
# reward server has an "animation" style judge next to the sketch one (§4.1). Same form as SKETCH_RUBRIC; the
# wording is ours.
ANIMATION_RUBRIC = (
    'Caption: "An animated film still of {prompt}. 3D animation style, like a Pixar movie."\n'
    "How well does the image match the caption? Check the style: looks like a frame of an animated film; "
    "stylised, simplified shapes and proportions; smooth, clean surfaces and bright, saturated colours; soft, "
    "even lighting; not a real photograph, not a pencil sketch. Check the content: the subject of the caption "
    "is there, complete and recognisable.\n"
    "Score from 0 (neither style nor content) to 5 (an animated film frame of exactly the caption). "
    "Answer with one digit."
)
# what a grid judge is told before its rubric, so a grid of frames is judged as one video, not as a collage
GRID_NOTE = "The image is a grid of frames from one video, in time order: left to right, then top to bottom.\n"


def load_vlm_animation(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    # the animation style judge; an image reward, scored per frame on videos (get_reward(..., video=True))
    return load_vlm_judge(path_or_hub_id, device, dtype, rubric=ANIMATION_RUBRIC, **kw)


def load_vlm_grid(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, rubric=SKETCH_RUBRIC, frames=4, **kw):
    # a VLM style judge on a frame grid: one image per video (frame_grid), the rubric behind GRID_NOTE
    return frame_grid(load_vlm_judge(path_or_hub_id, device, dtype, rubric=GRID_NOTE + rubric, **kw), frames)


def load_vlm_sketch_grid(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    return load_vlm_grid(path_or_hub_id, device, dtype, rubric=SKETCH_RUBRIC, **kw)


def load_vlm_animation_grid(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    return load_vlm_grid(path_or_hub_id, device, dtype, rubric=ANIMATION_RUBRIC, **kw)


def load_vlm_photo_grid(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, **kw):
    return load_vlm_grid(path_or_hub_id, device, dtype, rubric=PHOTO_RUBRIC, **kw)


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
    "tiny_photo_heldout": tiny_photo_heldout,  # held-out evaluators of the tiny world (train.py --heldout)
    "tiny_sketch_heldout": tiny_sketch_heldout,
    "tiny_preserve": tiny_preserve,  # the tiny editing world's pair: source preservation ...
    "tiny_adhere": tiny_adhere,  # ... and instruction adherence
    "temporal_flicker": temporal_flicker,  # videos only
}
MODEL = {  # name -> load_<name>(path_or_hub_id=None, device="cpu", dtype=torch.bfloat16, ...) -> reward fn
    "pickscore": load_pickscore,
    "pickscore_photo": load_pickscore_photo,
    "clipscore": load_clipscore,
    "clip_image_sim": load_clip_image_sim,
    "aesthetic": load_aesthetic,
    "dino_sim": load_dino_sim,
    "vlm_sketch": load_vlm_sketch,
    "vlm_photo": load_vlm_photo,
    # editing (FLUX.1 Kontext), with meta[i]["source"]: preservation = ssim (offline), clip_image_sim, dino_sim,
    # vlm_preserve; adherence = clip_direction, vlm_edit
    "clip_direction": load_clip_direction,
    "vlm_preserve": load_vlm_preserve,
    "vlm_edit": load_vlm_edit,
    # video (LTX-2): every image reward above is scored per frame (get_reward(..., video=True)); the grid judges
    # see 4 frames in one image
    "vlm_animation": load_vlm_animation,
    "vlm_sketch_grid": load_vlm_sketch_grid,
    "vlm_animation_grid": load_vlm_animation_grid,
    "vlm_photo_grid": load_vlm_photo_grid,
}
REWARDS = {**OFFLINE, **MODEL}
VIDEO = {"temporal_flicker", "vlm_sketch_grid", "vlm_animation_grid", "vlm_photo_grid"}  # these score videos only


def get_reward(name, device="cpu", video=False, **kw):
    # -> reward fn. Offline rewards take no options; model-based ones are loaded here (path_or_hub_id, dtype, ...).
    # video: the backbone makes videos [B,T,3,H,W]; an image reward then comes back as per_frame(fn), a video
    # reward as is. A video reward for an image backbone is refused before any weights load.
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid names: {', '.join(sorted(REWARDS))}")
    if name in VIDEO and not video:
        raise ValueError(f"reward {name!r} scores videos; this backbone makes images")
    if name in MODEL:
        LOADED.clear()
        fn = MODEL[name](device=device, **kw)
        modules = list(LOADED)  # what a caller moves off the GPU between scorings (train.py --offload)
    else:
        if kw:
            raise ValueError(f"reward {name!r} takes no options, got {sorted(kw)}")
        fn, modules = OFFLINE[name], []
    fn = per_frame(fn) if video and not getattr(fn, "video", False) else fn
    fn.modules = modules
    return fn
