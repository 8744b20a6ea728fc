# VAE parity with diffusers' AutoencoderKL (the oracle) on tiny random configs, loaded from a save_pretrained folder
# and from an original LDM-format single file; bad checkpoints; the full SD3.5 config on the meta device.
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from model import VAE_FLUX, VAE_SD3, AutoencoderKL, load_vae, vae_from_diffusers

SD3 = VAE_SD3["scaling"], VAE_SD3["shift"]
TINY = {  # name: (block_out_channels, layers_per_block)
    "2-level": ((32, 64), 1),
    "3-level": ((16, 32, 32), 2),  # a level with no width change: no nin_shortcut there
}
SD35_VAE_CONFIG = dict(  # stabilityai/stable-diffusion-3.5-medium vae/config.json
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)


def diffusers_config(channels, layers):
    n = len(channels)
    return dict(
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=16,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SD3[0],
        shift_factor=SD3[1],
    )


def to_original(sd, levels):
    """The test's own inverse of diffusers' convert_ldm_vae_checkpoint, written as string rules (the code under
    test parses keys instead), so the two are independent."""
    rules = [
        ("conv_norm_out", "norm_out"),
        ("mid_block.resnets.0", "mid.block_1"),
        ("mid_block.resnets.1", "mid.block_2"),
        ("mid_block.attentions.0", "mid.attn_1"),
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
        ("conv_shortcut", "nin_shortcut"),
        ("downsamplers.0", "downsample"),
        ("upsamplers.0", "upsample"),
        (".resnets.", ".block."),
    ]
    out = {}
    for key, t in sd.items():
        for a, b in rules:
            key = key.replace(a, b)
        key = re.sub(r"down_blocks\.(\d+)", r"down.\1", key)
        key = re.sub(r"up_blocks\.(\d+)", lambda m: f"up.{levels - 1 - int(m.group(1))}", key)
        out[key] = t[:, :, None, None] if ".attn_1." in key and t.ndim == 2 else t
    return out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """A random diffusers VAE, its save_pretrained folder and an original-format single file bundling other parts."""
    torch.manual_seed(0)
    channels, layers = TINY[request.param]
    ref = DiffusersAutoencoderKL(**diffusers_config(channels, layers)).eval()
    with torch.no_grad():  # default GroupNorm affine is (1, 0), which would hide a norm mix-up
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "repo" / "vae")
    original = to_original(ref.state_dict(), len(channels))
    bundle = {"first_stage_model." + k: t.clone() for k, t in original.items()}
    bundle["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(4, 16, 2, 2)  # must be ignored
    bundle["text_encoders.clip_l.logit_scale"] = torch.zeros(())
    save_file(bundle, tmp / "sd3.safetensors")
    return dict(
        ref=ref,
        channels=channels,
        original=original,
        folder=tmp / "repo" / "vae",
        root=tmp / "repo",
        single=tmp / "sd3.safetensors",
        tmp=tmp,
    )


def test_original_file_converts_back_exactly(tiny):
    ref_sd = tiny["ref"].state_dict()
    back = convert_ldm_vae_checkpoint(
        {"first_stage_model." + k: t for k, t in tiny["original"].items()}, dict(tiny["ref"].config)
    )
    assert back.keys() == ref_sd.keys()
    assert all(torch.equal(back[k], ref_sd[k]) for k in ref_sd)
    ours = vae_from_diffusers(ref_sd, len(tiny["channels"]))  # the code's own mapping agrees with the test's
    assert ours.keys() == tiny["original"].keys()
    assert all(torch.equal(ours[k], tiny["original"][k]) for k in ours)


@pytest.mark.parametrize("source", ["folder", "root", "single"])
def test_parity_with_diffusers(tiny, source):
    # norm groups and latent constants are not in a single file: the released VAEs use 32 groups, the tiny ones 8
    single = dict(groups=8, **VAE_SD3) if source == "single" else {}
    vae, ref = load_vae(tiny[source], **single), tiny["ref"]
    assert vae.config["channels"] == tiny["channels"] and (vae.scaling, vae.shift) == SD3
    torch.manual_seed(1)
    img = torch.rand(2, 3, 24, 40)  # non-square, batch 2
    with torch.no_grad():
        z = vae.encode(img)
        z_ref = (ref.encode(2 * img - 1).latent_dist.mean - SD3[1]) * SD3[0]
        raw = vae.decoder(z_ref / SD3[0] + SD3[1])
        raw_ref = ref.decode(z_ref / SD3[0] + SD3[1]).sample
        img_out = vae.decode(z_ref)
    f = 2 ** (len(tiny["channels"]) - 1)
    assert z.shape == (2, 16, 24 // f, 40 // f)
    errs = rel_err(z, z_ref), rel_err(raw, raw_ref), rel_err(img_out, ((raw_ref + 1) / 2).clamp(0, 1))
    print(f"{source} {tiny['channels']}: rel err encode {errs[0]:.2e} decode {errs[1]:.2e} clamped {errs[2]:.2e}")
    assert max(errs) <= 1e-5
    assert img_out.min() >= 0 and img_out.max() <= 1


def test_sample_matches_diffusers_posterior(tiny):
    vae, ref = load_vae(tiny["folder"]), tiny["ref"]
    img = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = vae.encode(img, sample=True, generator=torch.Generator().manual_seed(3))
        dist = ref.encode(2 * img - 1).latent_dist
        z_ref = (dist.sample(generator=torch.Generator().manual_seed(3)) - SD3[1]) * SD3[0]
        assert not torch.allclose(z_ref, (dist.mean - SD3[1]) * SD3[0])
    assert rel_err(z, z_ref) <= 1e-5


def test_constants_and_dtype(tiny):
    flux = load_vae(tiny["single"], groups=8, **VAE_FLUX)  # a single file has no config: the caller says which
    assert (flux.scaling, flux.shift) == (0.3611, 0.1159)
    with pytest.raises(
        ValueError,
        match=r"sd3.safetensors: a single-file VAE has no latent scaling/shift.*"
        r"VAE_SD3.*VAE_FLUX",
    ):
        load_vae(tiny["single"], groups=8)  # never SD3's constants by default
    with pytest.raises(ValueError, match="no latent scaling/shift"):
        load_vae(tiny["single"], groups=8, scaling=VAE_FLUX["scaling"])
    config = json.loads((tiny["folder"] / "config.json").read_text())
    (tiny["tmp"] / "flux_vae").mkdir(exist_ok=True)
    (tiny["tmp"] / "flux_vae" / "config.json").write_text(
        json.dumps(dict(config, scaling_factor=0.3611, shift_factor=0.1159))
    )
    (tiny["tmp"] / "flux_vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny["folder"] / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    from_config = load_vae(tiny["tmp"] / "flux_vae", dtype=torch.bfloat16)
    assert (from_config.scaling, from_config.shift) == (0.3611, 0.1159)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in from_config.parameters())
    with torch.no_grad():
        assert from_config.decode(from_config.encode(torch.rand(1, 3, 16, 16, dtype=torch.bfloat16))).isfinite().all()


def test_bfl_ae_file_with_flux_constants(tiny):
    # BFL's ae.safetensors: bare LDM keys, no prefix, no constants; FLUX's z = (mean - 0.1159) * 0.3611
    save_file({k: t.contiguous() for k, t in tiny["original"].items()}, tiny["tmp"] / "ae.safetensors")
    vae, ref = load_vae(tiny["tmp"] / "ae.safetensors", groups=8, **VAE_FLUX), tiny["ref"]
    img = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z, mean = vae.encode(img), ref.encode(2 * img - 1).latent_dist.mean
        assert rel_err(z, (mean - 0.1159) * 0.3611) <= 1e-5
        assert rel_err(vae.decode(z), ((ref.decode(z / 0.3611 + 0.1159).sample + 1) / 2).clamp(0, 1)) <= 1e-5


# --- bad checkpoints: each error names the file or the key


def write_original(tmp, name, sd):
    save_file({"first_stage_model." + k: t.contiguous() for k, t in sd.items()}, tmp / name)
    return tmp / name


def test_wrong_paths(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_vae(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)  # a folder that is neither vae/ nor a repo root
    data = tiny["single"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_vae(tmp_path / "cut.safetensors")


def test_missing_unexpected_misshaped_keys(tiny, tmp_path):
    sd = dict(tiny["original"])
    del sd["decoder.up.0.block.1.conv2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.up.0.block.1.conv2.bias"):
        load_vae(write_original(tmp_path, "missing.safetensors", sd), groups=8, **VAE_SD3)
    sd = dict(tiny["original"], **{"decoder.mid.attn_2.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): decoder.mid.attn_2.q.weight"):
        load_vae(write_original(tmp_path, "unexpected.safetensors", sd), groups=8, **VAE_SD3)
    q = tiny["original"]["encoder.mid.attn_1.q.weight"]
    sd = dict(tiny["original"], **{"encoder.mid.attn_1.q.weight": q[:, :, 0, 0]})  # a linear where a conv belongs
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): encoder.mid.attn_1.q.weight: "):
        load_vae(write_original(tmp_path, "misshaped.safetensors", sd), groups=8, **VAE_SD3)
    with pytest.raises(ValueError, match="encoder.mid_block.attentions.1.to_q.weight"):  # diffusers side
        vae_from_diffusers({"encoder.mid_block.attentions.1.to_q.weight": torch.zeros(2, 2)}, 2)


def test_unsupported_options(tiny, tmp_path):
    sd = dict(tiny["original"], **{"quant_conv.weight": torch.zeros(32, 32, 1, 1), "quant_conv.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="quant_conv"):
        load_vae(write_original(tmp_path, "quant.safetensors", sd))
    folder = tmp_path / "quant_vae"  # config.json without the option means diffusers' default: quant convs on
    folder.mkdir()
    config = json.loads((tiny["folder"] / "config.json").read_text())
    del config["use_quant_conv"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_quant_conv"):
        load_vae(folder)


def test_full_sd35_config_on_meta():
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL.from_config(SD35_VAE_CONFIG)
        ours = AutoencoderKL(**VAE_SD3)  # the defaults are the released architecture
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert round(n / 1e6, 1) == 83.8
    assert round(sum(p.numel() for p in ours.encoder.parameters()) / 1e6, 1) == 34.3
    mapped = {k: tuple(t.shape) for k, t in vae_from_diffusers(ref.state_dict(), 4).items()}
    assert mapped == {k: tuple(t.shape) for k, t in ours.state_dict().items()}
