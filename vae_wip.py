# --- VAE (SD3.5 / FLUX 16-channel AutoencoderKL)
# The LDM autoencoder (Rombach et al. 2022, ldm/modules/diffusionmodules/model.py) as SD3 and FLUX ship it: 16 latent
# channels, 8x downsampling, one single-head attention in the middle, no quant convs. Same layout as Stability's
# sd3_impls.py SDVAE and BFL's flux/modules/autoencoder.py. Attribute names ARE the original checkpoint keys, so the
# `first_stage_model.` part of a Stability single file (or BFL's ae.safetensors) loads as a plain dict; a diffusers
# `vae/` folder goes through `vae_key_from_diffusers`.
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open

# z = (mean - shift) * scaling puts latents where the transformer was trained (sd3_impls.py:271-282; flux util.py).
VAE_SD3 = dict(scaling=1.5305, shift=0.0609)
VAE_FLUX = dict(scaling=0.3611, shift=0.1159)


def vae_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class VAEResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = vae_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = vae_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        # a 1x1 conv only where the width changes; Identity has no weights, so no key
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = vae_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        height = x.shape[2]
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # one head of width C: scale 1/sqrt(C)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=height))


class VAEMidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels, groups)
        self.attn_1 = VAEAttnBlock(channels, groups)
        self.block_2 = VAEResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEDownsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, so 2k pixels give exactly k


class VAEUpsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAELevel(nn.Module):
    """One resolution level: `block` resnets, then a 2x `downsample` (encoder) or `upsample` (decoder) if asked.
    The Identity stand-ins have no weights, so they add no keys."""

    def __init__(self, cin, cout, n_blocks, groups, downsample=False, upsample=False):
        super().__init__()
        self.block = nn.ModuleList(VAEResnetBlock(cin if j == 0 else cout, cout, groups) for j in range(n_blocks))
        self.downsample = VAEDownsample(cout) if downsample else nn.Identity()
        self.upsample = VAEUpsample(cout) if upsample else nn.Identity()

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(self.downsample(x))


class VAEEncoder(nn.Module):
    def __init__(self, channels, layers, latent, groups):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        self.down = nn.ModuleList(
            VAELevel(channels[max(i - 1, 0)], channels[i], layers, groups, downsample=i < n - 1)
            for i in range(n))
        self.mid = VAEMidBlock(channels[-1], groups)
        self.norm_out = vae_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class VAEDecoder(nn.Module):
    def __init__(self, channels, layers, latent, groups):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv2d(latent, channels[-1], 3, padding=1)
        self.mid = VAEMidBlock(channels[-1], groups)
        # up[i] is indexed by resolution level like down[i] (0 = full size) but runs deepest-first; one more resnet
        # per level than the encoder, and every level but the full-size one doubles the resolution at its end.
        self.up = nn.ModuleList(
            VAELevel(channels[min(i + 1, n - 1)], channels[i], layers + 1, groups, upsample=i > 0)
            for i in range(n))
        self.norm_out = vae_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images [B,3,H,W] in [0,1] <-> latents [B,latent,H/f,W/f] scaled and shifted as the transformer expects
    (f = 2**(levels-1), 8 for the released VAEs)."""

    def __init__(self, channels=(128, 256, 512, 512), layers=2, latent=16, groups=32, scaling=1.5305, shift=0.0609):
        super().__init__()
        self.config = dict(channels=tuple(channels), layers=layers, latent=latent, groups=groups,
                           scaling=scaling, shift=shift)
        self.scaling, self.shift = scaling, shift
        self.encoder = VAEEncoder(channels, layers, latent, groups)
        self.decoder = VAEDecoder(channels, layers, latent, groups)

    def encode(self, img, sample=False, generator=None):
        mean, logvar = self.encoder(2 * img - 1).chunk(2, dim=1)  # the autoencoder works on [-1, 1]
        if sample:  # draw from the posterior N(mean, exp(logvar)), clamped as LDM's DiagonalGaussianDistribution
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean - self.shift) * self.scaling

    def decode(self, z):
        img = self.decoder(z / self.scaling + self.shift)
        return ((img + 1) / 2).clamp(0, 1)


def vae_key_from_diffusers(key, levels):
    """diffusers AutoencoderKL key -> original LDM key: the inverse of diffusers' convert_ldm_vae_checkpoint
    (loaders/single_file_utils.py:1510). The attention's linear -> 1x1 conv reshape is done by the caller."""
    part, name, *rest = key.split(".")  # part: encoder / decoder
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    levels_name = {"down_blocks": "down", "up_blocks": "up"}
    resample = {"downsamplers": "downsample", "upsamplers": "upsample"}
    if part not in ("encoder", "decoder") or not rest:
        raise ValueError(f"unknown diffusers VAE key {key}")
    if name in ("conv_in", "conv_out") and len(rest) == 1:
        return key
    if name == "conv_norm_out" and len(rest) == 1:
        return f"{part}.norm_out.{rest[0]}"
    if name in levels_name:
        # diffusers lists decoder levels deepest-first, LDM by resolution: up_blocks.0 is up.{levels-1}
        i = int(rest[0]) if name == "down_blocks" else levels - 1 - int(rest[0])
        if len(rest) == 5 and rest[1] == "resnets" and rest[3] in resnet:
            return f"{part}.{levels_name[name]}.{i}.block.{rest[2]}.{resnet[rest[3]]}.{rest[4]}"
        if len(rest) == 5 and rest[1] in resample and rest[2:4] == ["0", "conv"]:
            return f"{part}.{levels_name[name]}.{i}.{resample[rest[1]]}.conv.{rest[4]}"
    if name == "mid_block" and len(rest) == 4 and rest[0] == "resnets" and rest[2] in resnet:
        return f"{part}.mid.block_{int(rest[1]) + 1}.{resnet[rest[2]]}.{rest[3]}"
    if name == "mid_block" and rest[:2] == ["attentions", "0"] and rest[2] in attn:
        if len(rest) == 4 and rest[2] != "to_out" or len(rest) == 5 and rest[2:4] == ["to_out", "0"]:
            return f"{part}.mid.attn_1.{attn[rest[2]]}.{rest[-1]}"
    raise ValueError(f"unknown diffusers VAE key {key}")


def vae_from_diffusers(sd, levels):
    """A diffusers AutoencoderKL state dict in original keys; the only 2-D weights are the attention's linears,
    which the original stores as 1x1 convs [C, C, 1, 1]."""
    return {vae_key_from_diffusers(k, levels): t[:, :, None, None] if t.ndim == 2 else t for k, t in sd.items()}


def _read_safetensors(file, device, prefix=None):
    """The tensors of a file, or, when some keys start with `prefix`, only those (prefix stripped): a bundled single
    file then never loads its transformer or text encoders."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"VAE weights not found: {file}")
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            keys = list(f.keys())
            if prefix and any(k.startswith(prefix) for k in keys):
                return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"cannot read {file} as safetensors (truncated or corrupt?): {e}") from e


def _vae_config_from_diffusers(config, file):
    required = {  # option: (diffusers' default when config.json omits it, the only value implemented here)
        "_class_name": ("AutoencoderKL", "AutoencoderKL"), "in_channels": (3, 3), "out_channels": (3, 3),
        "act_fn": ("silu", "silu"), "use_quant_conv": (True, False), "use_post_quant_conv": (True, False),
        "mid_block_add_attention": (True, True), "latents_mean": (None, None), "latents_std": (None, None)}
    for opt, (default, want) in required.items():
        if config.get(opt, default) != want:
            raise ValueError(f"{file}: unsupported VAE option {opt}={config.get(opt, default)!r} (only the 16-channel "
                             f"SD3/FLUX AutoencoderKL is implemented, which has {opt}={want!r})")
    n = len(config["block_out_channels"])
    if list(config.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n or \
            list(config.get("up_block_types", ["UpDecoderBlock2D"] * n)) != ["UpDecoderBlock2D"] * n:
        raise ValueError(f"{file}: unsupported VAE block types {config.get('down_block_types')}, "
                         f"{config.get('up_block_types')}")
    return dict(channels=tuple(config["block_out_channels"]), layers=config["layers_per_block"],
                latent=config["latent_channels"], groups=config["norm_num_groups"],
                scaling=config["scaling_factor"], shift=config.get("shift_factor") or 0.0)


def _vae_config_from_shapes(sd, file):
    """Architecture from tensor shapes of an original-format state dict (norm groups are not in the shapes)."""
    for key in ("quant_conv.weight", "post_quant_conv.weight"):
        if key in sd:
            raise ValueError(f"{file}: has {key}: a 4-channel SD1/SDXL-style VAE with quant convs is not supported, "
                             "only the 16-channel SD3/FLUX AutoencoderKL")
    for key in ("encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"):
        if key not in sd:
            raise ValueError(f"{file}: missing VAE key {key} (not an LDM-format AutoencoderKL? for diffusers weights "
                             "pass the vae/ folder with its config.json)")
    channels, layers = [], 0
    while f"encoder.down.{len(channels)}.block.0.conv1.weight" in sd:
        channels.append(sd[f"encoder.down.{len(channels)}.block.0.conv1.weight"].shape[0])
    while f"encoder.down.0.block.{layers}.conv1.weight" in sd:
        layers += 1
    return dict(channels=tuple(channels), layers=layers, latent=sd["decoder.conv_in.weight"].shape[1])


def load_vae(path, dtype=torch.float32, device="cpu", scaling=None, shift=None, groups=None):
    """path: a diffusers vae/ folder, a diffusers repo root holding vae/, or one .safetensors file (Stability single
    file with first_stage_model.* keys, possibly bundling the transformer and text encoders, or BFL's
    ae.safetensors with bare keys). scaling/shift override config.json (a single file has none: SD3 constants
    unless given, e.g. **VAE_FLUX for FLUX's ae.safetensors); groups overrides GroupNorm's 32 for a single file."""
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in VAE folder {path}")
        with open(config_file) as f:
            config = _vae_config_from_diffusers(json.load(f), config_file)
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
        sd = vae_from_diffusers(_read_safetensors(file, device), len(config["channels"]))
    else:
        file = path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"VAE weights not found: {file} (expected a diffusers vae/ folder, a repo root "
                                    "holding vae/, or a .safetensors file)")
        sd = _read_safetensors(file, device, prefix="first_stage_model.")
        config = dict(_vae_config_from_shapes(sd, file), groups=32, **VAE_SD3)
    config.update({k: v for k, v in dict(scaling=scaling, shift=shift, groups=groups).items() if v is not None})
    sd = {k: t.to(dtype) for k, t in sd.items()}

    with torch.device("meta"):  # no random init, no second copy: the loaded tensors become the parameters
        vae = AutoencoderKL(**config)
    expected = {k: tuple(t.shape) for k, t in vae.state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    misshaped = [f"{k}: {tuple(sd[k].shape)} in file, {expected[k]} expected"
                 for k in sorted(expected.keys() & sd.keys()) if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        raise ValueError(f"{file} does not match the VAE {config}:\n  missing: {missing}\n  unexpected: {unexpected}"
                         f"\n  mis-shaped: {misshaped}")
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval().requires_grad_(False)  # frozen here; gradients still flow to the inputs (e.g. reward backprop)
