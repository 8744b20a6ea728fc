"""model.py's LTX-2 (transformer, text connectors, video VAE, audio VAE, vocoder) against diffusers (the oracle): tiny
random configs in fp32, the full configs on meta.

The test packs the latents and passes diffusers the coordinates' ingredients (F, h, w, fps, A) itself, as
LTX2Pipeline does (pipeline_ltx2.py:651-671, 727-745), so the code's own packing and RoPE positions are checked too.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kernels
import model

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ltx2_audio_vae_to_diffusers,
    convert_ltx2_transformer_to_diffusers,
    convert_ltx2_vae_to_diffusers,
)
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors  # noqa: E402
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline  # noqa: E402
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder  # noqa: E402

from tiny_repos import ltx2_to_diffusers  # noqa: E402

# equal head counts (2 x 16 video, 2 x 8 audio): the video RoPE's 3 x 5 frequencies leave one padding slot; audio
# tokens of 16 features = 8 latent channels x 2 mel bins
TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    audio_in_channels=16,
    audio_out_channels=16,
    audio_num_attention_heads=2,
    audio_attention_head_dim=8,
    audio_cross_attention_dim=16,
    num_layers=2,
    caption_channels=24,
    rope_type="split",
    rope_double_precision=True,
    timestep_scale_multiplier=1000,
    cross_attn_timestep_scale_multiplier=1000,
)

# the combined file's config (safetensors metadata "config" -> "transformer") in ltx-core's field names
# (ltx_core/model/transformer/model_configurator.py)
ORIGINAL_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    audio_num_attention_heads=2,
    audio_attention_head_dim=8,
    num_layers=2,
    in_channels=4,
    out_channels=4,
    audio_in_channels=16,
    audio_out_channels=16,
    cross_attention_dim=32,
    audio_cross_attention_dim=16,
    caption_channels=24,
    rope_type="split",
    frequencies_precision="float64",
    positional_embedding_theta=10000.0,
    positional_embedding_max_pos=[20, 2048, 2048],
    audio_positional_embedding_max_pos=[20],
    timestep_scale_multiplier=1000,
    av_ca_timestep_scale_multiplier=1000,
    use_middle_indices_grid=True,
    norm_eps=1e-6,
)


def diffusers_tiny(seed=0, **over):
    torch.manual_seed(seed)
    ref = LTX2VideoTransformer3DModel(**{**TINY, **over}).eval()
    with torch.no_grad():  # random everything so no term can hide behind an init
        for p in ref.state_dict().values():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref


def inputs(B=2, F=3, h=2, w=5, A=7, L=6, seed=1):
    # F > 1 (the causal first-frame fix), h != w, padding at both ends of the text
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, L)
    mask[0, :2], mask[1, L - 2 :] = 0, 0
    return dict(
        video=torch.randn(B, 4, F, h, w, generator=g),
        audio=torch.randn(B, 8, A, 2, generator=g),
        sigma=torch.tensor([0.999, 0.3])[:B],
        context=torch.randn(B, L, 24, generator=g),
        context_audio=torch.randn(B, L, 24, generator=g),
        context_mask=mask[:B],
    )


def ref_out(ref, inp, fps=24.0, mask=True):
    video, audio = inp["video"], inp["audio"]
    B, C, F, h, w = video.shape
    Ca, A, M = audio.shape[1:]
    m = inp["context_mask"] if mask else None
    with torch.no_grad():
        v, a = ref(
            hidden_states=video.flatten(2).transpose(1, 2),
            audio_hidden_states=audio.transpose(1, 2).flatten(2),
            encoder_hidden_states=inp["context"],
            audio_encoder_hidden_states=inp["context_audio"],
            timestep=1000 * inp["sigma"],
            encoder_attention_mask=m,
            audio_encoder_attention_mask=m,
            num_frames=F,
            height=h,
            width=w,
            fps=fps,
            audio_num_frames=A,
            return_dict=False,
        )
    return v.transpose(1, 2).reshape(B, C, F, h, w), a.reshape(B, A, Ca, M).transpose(1, 2)


def ours(net, inp, fps=24.0, mask=True, pref=None):
    with torch.no_grad():
        return net(
            inp["video"],
            inp["audio"],
            inp["sigma"],
            context=inp["context"],
            context_audio=inp["context_audio"],
            context_mask=inp["context_mask"] if mask else None,
            fps=fps,
            pref=pref,
        )


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_parity(net, ref, inp, what):
    for fps in (24.0, 25.0):
        for mask in (False, True):
            (v, a), (rv, ra) = ours(net, inp, fps, mask), ref_out(ref, inp, fps, mask)
            ev, ea = rel_err(v, rv), rel_err(a, ra)
            print(f"{what}, fps {fps}, mask {mask}: video rel err {ev:.2e}, audio {ea:.2e}")
            assert ev <= 1e-5 and ea <= 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = diffusers_tiny()
    root = tmp_path_factory.mktemp("ltx2")
    ref.save_pretrained(root / "repo" / "transformer")
    return dict(ref=ref, root=root, repo=root / "repo", inp=inputs())


def combined_file(ref, path, config=ORIGINAL_CONFIG, edit=None):
    # Lightricks' layout: the DiT and the text connectors under model.diffusion_model., the other components beside
    orig = model.ltx2_from_diffusers({k: v.clone() for k, v in ref.state_dict().items()})
    sd = {f"model.diffusion_model.{k}": v for k, v in orig.items()}
    sd["model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"] = torch.zeros(3, 3)
    sd["model.diffusion_model.audio_embeddings_connector.learnable_registers"] = torch.zeros(4, 3)
    sd["text_embedding_projection.aggregate_embed.weight"] = torch.zeros(3, 5)
    sd["vae.per_channel_statistics.mean-of-means"] = torch.zeros(4)
    sd["audio_vae.per_channel_statistics.mean-of-means"] = torch.zeros(4)
    sd["vocoder.conv_pre.weight"] = torch.zeros(2, 2)
    if edit:
        edit(sd)
    meta = None if config is None else {"config": json.dumps({"transformer": config, "vae": {"dims": 3}})}
    save_file(sd, path, metadata=meta)
    return str(path)


def test_parity_diffusers_folder(tiny):
    net = model.load_transformer(str(tiny["repo"]))  # repo root holding transformer/
    assert isinstance(net, model.LTX2Transformer) and net.cfg.rope_type == "split" and net.cfg.heads == 2
    check_parity(net, tiny["ref"], tiny["inp"], "folder")
    # the mask and fps reach the output (so the parity above covers them)
    inp = tiny["inp"]
    (v0, a0), (v1, a1), (v2, _) = ours(net, inp), ours(net, inp, mask=False), ours(net, inp, fps=25.0)
    assert rel_err(v0, v1) > 1e-3 and rel_err(a0, a1) > 1e-3 and rel_err(v0, v2) > 1e-4


def test_parity_interleaved_rope(tmp_path):
    ref = diffusers_tiny(seed=2, rope_type="interleaved", rope_double_precision=False)
    ref.save_pretrained(tmp_path)
    net = model.load_transformer(str(tmp_path))
    assert net.cfg.rope_type == "interleaved" and not net.cfg.rope_double_precision
    check_parity(net, ref, inputs(B=1, F=2, h=3, w=2, A=4), "interleaved")


def test_combined_single_file(tiny):
    dsd = {k: v.clone() for k, v in tiny["ref"].state_dict().items()}
    orig = model.ltx2_from_diffusers(dsd)  # our keys ARE ltx-core's
    back = convert_ltx2_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in orig.items()})
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    assert ltx2_to_diffusers(orig).keys() == dsd.keys()
    read = []  # the tensors materialised: the transformer's only, never the VAEs', vocoder's or connectors'

    class Spy:
        def __init__(self, *a, **k):
            self.f = safe_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, k):
            read.append(k)
            return self.f.get_tensor(k)

        def __getattr__(self, name):
            return getattr(self.f, name)

    path = combined_file(tiny["ref"], tiny["root"] / "ltx-2-tiny.safetensors")
    model.safe_open, real = Spy, model.safe_open
    try:
        net = model.load_transformer(path)
    finally:
        model.safe_open = real
    assert len(read) == len(net.state_dict()) and not any(k.startswith(("vae.", "audio_vae.", "vocoder.")) or
                                                          "connector" in k for k in read)  # fmt: skip
    assert net.cfg == model.load_transformer(str(tiny["repo"])).cfg
    assert not any("connector" in k or "vae" in k for k in net.state_dict())
    check_parity(net, tiny["ref"], tiny["inp"], "combined file")


def test_combined_file_errors(tiny, tmp_path):
    ref = tiny["ref"]
    with pytest.raises(ValueError, match="LTX-2 single file without its config"):
        model.load_transformer(combined_file(ref, tmp_path / "a.safetensors", config=None))
    partial = {k: v for k, v in ORIGINAL_CONFIG.items() if k != "av_ca_timestep_scale_multiplier"}
    with pytest.raises(ValueError, match=r"lacks \['av_ca_timestep_scale_multiplier'\]"):
        model.load_transformer(combined_file(ref, tmp_path / "b.safetensors", config=partial))
    with pytest.raises(ValueError, match="unsupported rope_type 'rotary'"):
        model.load_transformer(
            combined_file(ref, tmp_path / "c.safetensors", config={**ORIGINAL_CONFIG, "rope_type": "rotary"})
        )
    key = "model.diffusion_model.transformer_blocks.1.audio_to_video_attn.k_norm.weight"
    with pytest.raises(ValueError, match=r"missing keys \(1\): transformer_blocks.1.audio_to_video_attn.k_norm.weight"):
        model.load_transformer(combined_file(ref, tmp_path / "d.safetensors", edit=lambda sd: sd.pop(key)))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): transformer_blocks.0.attn1.to_gate_logits.weight"):
        model.load_transformer(
            combined_file(
                ref,
                tmp_path / "e.safetensors",
                edit=lambda sd: sd.__setitem__(
                    "model.diffusion_model.transformer_blocks.0.attn1.to_gate_logits.weight", torch.zeros(2, 32)
                ),
            )
        )
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): transformer_blocks.0.scale_shift_table"):
        model.load_transformer(
            combined_file(
                ref,
                tmp_path / "f.safetensors",
                edit=lambda sd: sd.__setitem__(
                    "model.diffusion_model.transformer_blocks.0.scale_shift_table", torch.zeros(9, 32)
                ),
            )
        )


def test_diffusers_folder_errors(tiny, tmp_path):
    folder = tmp_path / "d"
    tiny["ref"].save_pretrained(folder)
    c = json.loads((folder / "config.json").read_text())
    for bad, msg in [
        ({"gated_attn": True}, r"gated_attn=True \(only False\)"),
        ({"cross_attn_mod": True}, r"cross_attn_mod=True"),
        ({"use_prompt_embeddings": False}, "use_prompt_embeddings=False"),
        ({"rope_type": "rotary"}, "unsupported rope_type 'rotary'"),
        ({"audio_num_attention_heads": 4, "audio_attention_head_dim": 4}, "head counts must be equal"),
        ({"out_channels": 8}, "out_channels 8 != in_channels 4"),
        ({"use_rope_v3": True}, r"config options: \['use_rope_v3'\]"),
    ]:
        (folder / "config.json").write_text(json.dumps({**c, **bad}))
        with pytest.raises(ValueError, match=msg):
            model.load_transformer(str(folder))
    (folder / "config.json").write_text(json.dumps(c))
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    del sd["transformer_blocks.1.video_a2v_cross_attn_scale_shift_table"]
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): transformer_blocks.1.scale_shift_table_a2v_ca_video"):
        model.load_transformer(str(folder))


def test_full_size_on_meta():
    with torch.device("meta"):
        ref = LTX2VideoTransformer3DModel(rope_type="split")  # the other defaults are the 2.0 release's
    cfg = model.ltx2_config_from_diffusers({k: v for k, v in ref.config.items() if not k.startswith("_")})
    assert cfg == model.LTX2Config(**model.LTX2_PRESETS["ltx2-19b"])
    with torch.device("meta"):
        net = model.LTX2Transformer(cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ltx2_to_diffusers(net.state_dict()).items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    n = sum(p.numel() for p in net.parameters())
    assert n == 18_876_174_592 == sum(p.numel() for p in ref.parameters())
    assert len(net.state_dict()) == 3510  # diffusers single_file_utils.py:4151-4221
    meta = {
        "config": json.dumps(
            {
                "transformer": {
                    "num_attention_heads": 32,
                    "audio_num_attention_heads": 32,
                    "rope_type": "split",
                    "frequencies_precision": "float64",
                    "av_ca_timestep_scale_multiplier": 1000,
                }
            }
        )
    }
    assert model.ltx2_config_from_state(net.state_dict(), meta) == cfg


def test_pref_none_is_base_bit_exact_and_slider_on_video(tiny):
    base = model.load_transformer(str(tiny["repo"]))
    cond = model.load_transformer(str(tiny["repo"]), pref_dim=2)
    inp, pref = tiny["inp"], torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    vb, ab = ours(base, inp)
    vc, ac = ours(cond, inp)
    assert torch.equal(vb, vc) and torch.equal(ab, ac)
    v, a = ours(cond, inp, pref=pref)
    assert v.shape == vb.shape and a.shape == ab.shape and not torch.equal(v, vb)  # pref_mlp acts
    with torch.no_grad():  # pref_mlp off, slider's last layer still zero: the base model again
        cond.pref_mlp[2].weight.zero_()
    v, a = ours(cond, inp, pref=pref)
    assert torch.equal(v, vb) and torch.equal(a, ab)
    seen = []
    hook = cond.transformer_blocks[0].register_forward_hook(lambda mod, i, o: seen.append([t.clone() for t in o]))
    with torch.no_grad():
        cond.pref_slider.mlp[-1].bias.add_(0.5)
    v, a = ours(cond, inp, pref=pref)
    ours(cond, inp)
    hook.remove()
    assert not torch.allclose(v, vb) and not torch.allclose(a, ab)  # audio too, through v2a in block 1
    (x1, a1), (x0, a0) = seen
    assert torch.equal(a1, a0) and not torch.allclose(x1, x0)  # in a block, m joins the video tokens only
    with pytest.raises(ValueError, match=r"pref must have shape \[2, 2\]"):
        ours(cond, inp, pref=pref[:, :1])
    with pytest.raises(ValueError, match="no preference input"):
        ours(base, inp, pref=pref)


def test_bad_inputs(tiny):
    net, inp = model.load_transformer(str(tiny["repo"])), tiny["inp"]
    for bad, msg in [
        (dict(context=inp["context"][..., :8]), r"context must be \[B, L, 24\]"),
        (dict(context_audio=inp["context_audio"][..., :8]), r"context_audio must be \[B, L, 24\]"),
        (dict(video=inp["video"][:, :3]), r"video must be a latent \[B, 4, F, h, w\]"),
        (dict(video=inp["video"][:, :, 0]), r"video must be a latent"),
        (dict(audio=inp["audio"][:, :4]), r"audio must be a latent \[B, 8, A, 2\]"),
        (dict(audio=inp["audio"][..., :1]), r"audio must be a latent \[B, 8, A, 2\]"),
        (dict(audio=inp["audio"][:1]), "batch sizes differ: video 2, audio 1"),
        (dict(sigma=inp["sigma"][:1]), "batch sizes differ"),
        (dict(context_mask=inp["context_mask"][:, :4]), r"attention mask must be \[B, Lk\]"),
        (dict(context_audio=inp["context_audio"][:, :3]), "lengths 6 and 3 must be equal"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ours(net, {**inp, **bad})


def test_kernels_grad_ckpt_and_lora():
    # the tiny preset (one block: the interpreter is slow): Triton kernels equal the references, forward and
    # backward, and so does gradient checkpointing; LoRA lands on the q, k, v, out of all six attentions of a block
    torch.manual_seed(0)
    cfg = model.LTX2Config(**{**model.LTX2_PRESETS["ltx2-tiny"], "depth": 1}, pref_dim=2)
    net = model.LTX2Transformer(cfg)
    assert len(model.add_lora(net, rank=2, alpha=4)) == cfg.depth * 6 * 4
    with torch.no_grad():  # random everything, so zero-inits (slider, LoRA B) cannot hide a term
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    video, audio = torch.randn(1, 16, 2, 2, 3, generator=g), torch.randn(1, 8, 3, 2, generator=g)
    kw = dict(
        context=torch.randn(1, 4, 64, generator=g),
        context_audio=torch.randn(1, 4, 64, generator=g),
        context_mask=torch.tensor([[0, 1, 1, 1]]),
        pref=torch.tensor([[0.2, 0.8]]),
    )

    def run(backend, ckpt):
        kernels.set_backend(backend)
        net.zero_grad(set_to_none=True)
        net.grad_ckpt = ckpt
        v, a = net(video, audio, torch.tensor([0.6]), **kw)
        (v.square().mean() + a.square().mean()).backward()
        return [v.detach(), a.detach()] + [p.grad for p in net.parameters() if p.requires_grad]

    try:
        t = run("triton", False)
    finally:
        kernels.set_backend("torch")
    r, c = run("torch", False), run("torch", True)
    assert len(r) == len(t) == len(c) and all(x is not None for x in r)
    for a, b, d in zip(t, r, c):
        torch.testing.assert_close(a, b, atol=1e-5 * (1 + b.abs().max().item()), rtol=1e-4)
        torch.testing.assert_close(d, b, atol=1e-6, rtol=1e-5)


def test_lora_export_loads_in_diffusers(tiny, tmp_path):
    from diffusers import LTX2Pipeline

    net = model.load_transformer(str(tiny["repo"]), pref_dim=2)
    model.add_lora(net, rank=4, alpha=8)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for p in model.adapter_state(net).values():
            p.copy_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    model.export_lora_diffusers(net, path)
    assert "transformer.transformer_blocks.1.audio_to_video_attn.norm_q.weight" not in load_file(path)
    assert "transformer.transformer_blocks.1.audio_to_video_attn.to_q.lora_A.weight" in load_file(path)
    pipe = LTX2Pipeline(
        transformer=diffusers_tiny(),
        scheduler=None,
        vae=None,
        audio_vae=None,
        text_encoder=None,
        tokenizer=None,
        connectors=None,
        vocoder=None,
    )
    pipe.load_lora_weights(path)
    model.merge_lora(net)
    (v, a), (rv, ra) = ours(net, tiny["inp"]), ref_out(pipe.transformer, tiny["inp"])
    print(
        f"LoRA export through LTX2Pipeline.load_lora_weights: video rel err {rel_err(v, rv):.2e}, "
        f"audio {rel_err(a, ra):.2e}"
    )
    assert rel_err(v, rv) <= 1e-5 and rel_err(a, ra) <= 1e-5
    assert rel_err(v, ref_out(tiny["ref"], tiny["inp"])[0]) > 1e-3  # the LoRA matters


# ---------------------------------------------------------------------------------------------------------------------
# Text connectors (model.LTX2TextConnectors) against diffusers' LTX2TextConnectors

# width 16 = 2 heads x 8 (video) = 4 heads x 4 (audio), 3 stacked "Gemma" layers, 4 and 2 registers, unequal depths
CONNECTORS_TINY = dict(
    caption_channels=16,
    text_proj_in_factor=3,
    video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=8,
    video_connector_num_layers=2,
    video_connector_num_learnable_registers=4,
    audio_connector_num_attention_heads=4,
    audio_connector_attention_head_dim=4,
    audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=2,
    rope_type="split",
    rope_double_precision=True,
)
# the same in the combined file's metadata (config -> transformer, ltx-core names)
CONNECTORS_META = dict(
    rope_type="split",
    frequencies_precision="float64",
    connector_positional_embedding_max_pos=[4096],
    connector_num_attention_heads=2,
    connector_attention_head_dim=8,
    audio_connector_num_attention_heads=4,
    audio_connector_attention_head_dim=4,
)


@pytest.fixture(scope="module")
def connectors(tmp_path_factory):
    torch.manual_seed(0)
    ref = LTX2TextConnectors(**CONNECTORS_TINY).eval()
    with torch.no_grad():
        for p in ref.state_dict().values():
            p.copy_(torch.randn_like(p) * 0.3)
    root = tmp_path_factory.mktemp("connectors")
    ref.save_pretrained(root / "repo" / "connectors")
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3], mask[2, :6] = 0, 0  # left padding: none, 3, 6
    return dict(ref=ref, root=root, h=torch.randn(3, 8, 16, 3, generator=g) * 5 + 1, mask=mask)


def connectors_file(ref, path, inside=False, edit=None):
    # Lightricks' layout: the connectors under model.diffusion_model., aggregate_embed beside (or inside) it, next to
    # the DiT and the VAE
    sd = {model.ltx2_connector_key(k, to_diffusers=False): v.clone() for k, v in ref.state_dict().items()}
    sd = {
        k if k.startswith("text_embedding_projection.") and not inside else f"model.diffusion_model.{k}": v
        for k, v in sd.items()
    }
    sd["model.diffusion_model.patchify_proj.weight"] = torch.zeros(4, 4)
    sd["vae.per_channel_statistics.mean-of-means"] = torch.zeros(4)
    if edit:
        edit(sd)
    save_file(sd, path, metadata={"config": json.dumps({"transformer": CONNECTORS_META})})
    return str(path)


def check_connectors(net, c, what):
    with torch.no_grad():
        (v, a, m), (rv, ra, rm) = net(c["h"], c["mask"]), c["ref"](c["h"], c["mask"])
    ev, ea = rel_err(v, rv), rel_err(a, ra)
    print(f"connectors {what}: video rel err {ev:.2e}, audio {ea:.2e}")
    assert ev <= 1e-5 and ea <= 1e-5 and torch.equal(m, rm.to(m.dtype)) and bool(m.all())


def test_connectors_parity_diffusers_folder(connectors):
    net = model.load_ltx2_connectors(connectors["root"] / "repo")  # repo root holding connectors/
    assert (net.cfg.heads, net.cfg.audio_heads, net.cfg.depth, net.cfg.audio_depth) == (2, 4, 2, 1)
    check_connectors(net, connectors, "folder")
    # the padding matters (the masked norm, the registers), and so does every row's own padding
    with torch.no_grad():
        v0 = net(connectors["h"], connectors["mask"])[0]
        v1 = net(connectors["h"], torch.ones_like(connectors["mask"]))[0]
    assert rel_err(v0[1:], v1[1:]) > 1e-2 and torch.equal(v0[0], v1[0])


def test_connectors_combined_file(connectors, tmp_path):
    dsd = connectors["ref"].state_dict()
    orig = {model.ltx2_connector_key(k, to_diffusers=False): v for k, v in dsd.items()}
    assert {model.ltx2_connector_key(k) for k in orig} == set(dsd)
    assert "video_embeddings_connector.transformer_1d_blocks.1.attn1.q_norm.weight" in orig
    assert "text_embedding_projection.aggregate_embed.weight" in orig
    for inside in (False, True):
        file = connectors_file(connectors["ref"], tmp_path / f"c{inside}.safetensors", inside)
        net = model.load_ltx2_connectors(file)
        assert net.cfg == model.load_ltx2_connectors(connectors["root"] / "repo").cfg
        check_connectors(net, connectors, f"combined file (aggregate_embed inside the prefix: {inside})")


def test_connectors_errors(connectors, tmp_path):
    key = "model.diffusion_model.audio_embeddings_connector.transformer_1d_blocks.0.ff.net.2.bias"
    with pytest.raises(ValueError, match=r"missing keys \(1\): audio_embeddings_connector.transformer_1d_blocks.0.ff"):
        model.load_ltx2_connectors(
            connectors_file(connectors["ref"], tmp_path / "m.safetensors", edit=lambda sd: sd.pop(key))
        )
    net, h, mask = model.load_ltx2_connectors(connectors["root"] / "repo"), connectors["h"], connectors["mask"]
    with pytest.raises(ValueError, match="left-padded"):
        net(h, mask.flip(1))  # right padding
    with pytest.raises(ValueError, match="multiple of the connector's 4 registers"):
        net(h[:, :6], mask[:, :6])
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, L, 16, 3\]"):
        net(h[..., :2], mask)
    folder = connectors["root"] / "repo" / "connectors"
    c = json.loads((folder / "config.json").read_text())
    try:
        (folder / "config.json").write_text(json.dumps({**c, "per_modality_projections": True}))
        with pytest.raises(ValueError, match=r"per_modality_projections=True \(only False\)"):
            model.load_ltx2_connectors(folder)
    finally:
        (folder / "config.json").write_text(json.dumps(c))


def test_connectors_full_size_on_meta():
    with torch.device("meta"):
        ref = LTX2TextConnectors(rope_type="split")  # the other defaults are the 2.0 release's
    cfg = model.ltx2_connector_config_from_diffusers(dict(ref.config))
    assert cfg == model.LTX2ConnectorConfig()
    with torch.device("meta"):
        net = model.LTX2TextConnectors(cfg)
    assert {model.ltx2_connector_key(k): tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert sum(p.numel() for p in net.parameters()) == 1_431_475_200 == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Video VAE (model.LTX2VideoVAE through model.load_vae) against diffusers' AutoencoderKLLTX2Video

# the release topology (spatial, temporal, 2 x spatiotemporal down; 3 x spatiotemporal up) at tiny widths; the decoder
# non-causal as released (diffusers' class default is causal)
VAE_TINY = dict(
    latent_channels=8,
    block_out_channels=(8, 16, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    layers_per_block=(1, 1, 2, 1, 1),
    decoder_layers_per_block=(1, 2, 1, 1),
    decoder_causal=False,
)


def diffusers_vae(seed=0, **over):
    torch.manual_seed(seed)
    ref = AutoencoderKLLTX2Video(**{**VAE_TINY, **over}).eval()
    with torch.no_grad():
        for k, p in ref.state_dict().items():  # statistics too (std positive)
            p.copy_(torch.rand_like(p) + 0.5 if k == "latents_std" else torch.randn_like(p) * 0.2)
    return ref


@pytest.fixture(scope="module")
def video_vae(tmp_path_factory):
    ref = diffusers_vae()
    root = tmp_path_factory.mktemp("ltx2_vae")
    ref.save_pretrained(root / "repo" / "vae")
    g = torch.Generator().manual_seed(2)
    return dict(
        ref=ref, root=root, video=torch.rand(2, 3, 9, 64, 96, generator=g), z=torch.randn(2, 8, 2, 2, 3, generator=g)
    )


def ref_vae(ref, video=None, z=None):
    # diffusers' encode / decode with the pipeline's per-channel (de)normalisation (pipeline_ltx2.py:687-704)
    mean, std = ref.latents_mean.view(1, -1, 1, 1, 1), ref.latents_std.view(1, -1, 1, 1, 1)
    with torch.no_grad():
        if video is not None:
            return (ref.encode(2 * video - 1).latent_dist.mean - mean) / std
        return ((ref.decode(z * std + mean).sample + 1) / 2).clamp(0, 1)


def check_vae(vae, v, what):
    ref = v["ref"]
    with torch.no_grad():
        z, x = vae.encode(v["video"]), vae.decode(v["z"])
        raw, rraw = vae.decoder(v["z"]), ref.decoder(v["z"])  # before the clamp to [0, 1]
    ez, ex, er = rel_err(z, ref_vae(ref, video=v["video"])), rel_err(x, ref_vae(ref, z=v["z"])), rel_err(raw, rraw)
    print(f"LTX-2 VAE {what}: encode rel err {ez:.2e}, decode {ex:.2e}, decoder before the clamp {er:.2e}")
    assert z.shape == (2, 8, 2, 2, 3) and x.shape == (2, 3, 9, 64, 96)
    assert ez <= 1e-5 and ex <= 1e-5 and er <= 1e-5


def test_vae_parity_diffusers_folder(video_vae):
    vae = model.load_vae(video_vae["root"] / "repo")  # repo root holding vae/
    assert isinstance(vae, model.LTX2VideoVAE) and vae.cfg.factors == (8, 32)
    assert vae.cfg.encoder_causal and not vae.cfg.decoder_causal
    check_vae(vae, video_vae, "folder")
    with torch.no_grad():  # the test tells a causal decoder from the released non-causal one
        causal = diffusers_vae(decoder_causal=True).decoder(video_vae["z"])
        assert rel_err(vae.decoder(video_vae["z"]), causal) > 1e-3


def test_vae_combined_file(video_vae, tmp_path):
    ref, cfg = video_vae["ref"], model.load_vae(video_vae["root"] / "repo").cfg
    dsd = {k: v.clone() for k, v in ref.state_dict().items()}
    orig = model.ltx2_vae_from_diffusers(dsd, cfg)  # our keys ARE ltx-core's: diffusers' converter maps them back
    assert "encoder.down_blocks.7.conv.conv.weight" in orig
    assert "decoder.up_blocks.6.res_blocks.0.conv2.conv.bias" in orig
    back = convert_ltx2_vae_to_diffusers({f"vae.{k}": v for k, v in orig.items()})
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    sd = {f"vae.{k}": v for k, v in orig.items()}
    sd.update(
        {
            "vae.per_channel_statistics.channel": torch.arange(8.0),  # in the file, dropped as diffusers does
            "vae.per_channel_statistics.mean-of-stds": torch.ones(8),
            "model.diffusion_model.patchify_proj.weight": torch.zeros(4, 4),
            "audio_vae.per_channel_statistics.mean-of-means": torch.zeros(4),
        }
    )
    save_file(sd, tmp_path / "ltx-2-tiny.safetensors")
    vae = model.load_vae(tmp_path / "ltx-2-tiny.safetensors")
    assert vae.cfg == cfg
    check_vae(vae, video_vae, "combined file")
    bare = {k: v for k, v in orig.items() if k != "decoder.up_blocks.3.conv.conv.bias"}
    save_file(bare, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.up_blocks.3.conv.conv.bias"):
        model.load_vae(tmp_path / "bare.safetensors")


def test_vae_bad_inputs_and_options(video_vae, tmp_path):
    vae, video = model.load_vae(video_vae["root"] / "repo"), video_vae["video"]
    for bad in (video[:, :, :8], video[:, :, :, :48], video[:, :, :, :, :80], video[:, :2], video[0]):
        with pytest.raises(ValueError, match=r"must be \[B, 3, F, H, W\] with F = 8k\+1 and H, W multiples of 32"):
            vae.encode(bad)
    with pytest.raises(ValueError, match=r"latents must be \[B, 8, F, h, w\]"):
        vae.decode(video_vae["z"][:, :4])
    with pytest.raises(ValueError, match="takes no shift or groups"):
        model.load_vae(video_vae["root"] / "repo", shift=0.1)
    folder = tmp_path / "vae"
    video_vae["ref"].save_pretrained(folder)
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, "timestep_conditioning": True}))
    with pytest.raises(ValueError, match=r"timestep_conditioning=True \(only False\)"):
        model.load_vae(folder)


def test_vae_full_size_on_meta():
    with torch.device("meta"):
        ref = AutoencoderKLLTX2Video(decoder_causal=False)  # the other defaults are the 2.0 release's
    cfg = model.ltx2_vae_config_from_diffusers(dict(ref.config), "config.json")
    assert cfg == model.LTX2VAEConfig() and cfg.factors == (8, 32)
    with torch.device("meta"):
        vae = model.LTX2VideoVAE(cfg)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == {
        k: tuple(v.shape) for k, v in model.ltx2_vae_from_diffusers(ref.state_dict(), cfg).items()
    }
    assert sum(p.numel() for p in vae.parameters()) == 1_222_479_601 == sum(p.numel() for p in ref.parameters())
    assert model.ltx2_vae_config_from_state(vae.state_dict()) == cfg  # the architecture is in the shapes


# ---------------------------------------------------------------------------------------------------------------------
# Audio VAE and vocoder (model.LTX2AudioVAE, model.LTX2Vocoder through model.load_ltx2_audio) against diffusers'
# AutoencoderKLLTX2Audio and LTX2Vocoder

# base_channels must equal latent_channels x mel_bins/4 (diffusers sizes the packed-token statistics by it): 32 = 8 x 4;
# ch_mult[0] != 1 so the encoder's conv_in width differs from level 0's
AUDIO_TINY = dict(base_channels=32, ch_mult=(2, 3, 4), num_res_blocks=1, latent_channels=8, mel_bins=16)
# non-default upsample rates, which no shape holds: the combined file must take them from its metadata
VOCODER_TINY = dict(in_channels=32, hidden_channels=32, upsample_kernel_sizes=[11, 8, 4], upsample_factors=[5, 4, 2])
# scripts/convert_ltx2_to_diffusers.py (huggingface/diffusers) LTX_2_0_VOCODER_RENAME_DICT: original -> diffusers by
# substring replacement (diffusers has no single-file converter for the vocoder)
VOCODER_RENAMES = {"ups": "upsamplers", "resblocks": "resnets", "conv_pre": "conv_in", "conv_post": "conv_out"}


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Audio(**AUDIO_TINY).eval()
    voc = LTX2Vocoder(**VOCODER_TINY).eval()
    with torch.no_grad():
        for k, p in vae.state_dict().items():  # statistics too (std positive)
            p.copy_(torch.rand_like(p) + 0.5 if k == "latents_std" else torch.randn_like(p) * 0.2)
        for p in voc.parameters():  # small enough that the final tanh does not saturate
            p.copy_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("ltx2_audio")
    vae.save_pretrained(root / "repo" / "audio_vae")
    voc.save_pretrained(root / "repo" / "vocoder")
    g = torch.Generator().manual_seed(3)
    return dict(
        vae=vae,
        voc=voc,
        root=root,
        z=torch.randn(2, 8, 5, 4, generator=g),
        mel=torch.randn(2, 2, 17, 16, generator=g),
        mel_odd=torch.randn(2, 2, 14, 16, generator=g),
    )


def ref_audio(ref, z=None, mel=None):
    # diffusers' decode / encode with LTX2Pipeline's packed-token (de)normalisation
    # (pipeline_ltx2.py:707-760, 1623-1663)
    P, M = LTX2Pipeline, ref.config.mel_bins // 4
    with torch.no_grad():
        if z is not None:
            z = P._denormalize_audio_latents(P._pack_audio_latents(z), ref.latents_mean, ref.latents_std)
            return ref.decode(P._unpack_audio_latents(z, z.shape[1], num_mel_bins=M)).sample
        h = P._normalize_audio_latents(
            P._pack_audio_latents(ref.encode(mel).latent_dist.mean), ref.latents_mean, ref.latents_std
        )
        return P._unpack_audio_latents(h, h.shape[1], num_mel_bins=M)


def check_audio(vae, voc, a, what):
    with torch.no_grad():
        x, z, z_odd, wav = vae.decode(a["z"]), vae.encode(a["mel"]), vae.encode(a["mel_odd"]), voc(a["mel"])
        rwav = a["voc"](a["mel"])
    ex, ez = rel_err(x, ref_audio(a["vae"], z=a["z"])), rel_err(z, ref_audio(a["vae"], mel=a["mel"]))
    eo, ew = rel_err(z_odd, ref_audio(a["vae"], mel=a["mel_odd"])), rel_err(wav, rwav)
    print(f"LTX-2 audio {what}: decode rel err {ex:.2e}, encode {ez:.2e} (T=14: {eo:.2e}), vocoder {ew:.2e}")
    assert x.shape == (2, 2, 17, 16) and z.shape == (2, 8, 5, 4) and z_odd.shape == (2, 8, 4, 4)  # 4A-3 <-> A
    assert wav.shape == (2, 2, 17 * 40) and wav.abs().max() < 0.99  # 5 x 4 x 2 samples per mel frame, unsaturated
    assert max(ex, ez, eo, ew) <= 1e-5


def test_audio_parity_diffusers_folder(audio):
    vae, voc = model.load_ltx2_audio(audio["root"] / "repo")  # repo root holding audio_vae/ and vocoder/
    assert vae.cfg == model.LTX2AudioVAEConfig(widths=(64, 96, 128), ch=32, num_res_blocks=1, mel_bins=16)
    assert voc.cfg.upsample_rates == (5, 4, 2)
    assert model.load_ltx2_vocoder(audio["root"] / "repo" / "vocoder").cfg == voc.cfg  # the component folder too
    check_audio(vae, voc, audio, "folder")


def audio_combined(a, file, meta=True, edit=None):
    # invert the renames: ours are ltx-core's keys, and diffusers' converters map them back exactly
    vsd, csd = a["vae"].state_dict(), a["voc"].state_dict()
    orig_vae = {f"audio_vae.{model.ltx2_audio_key(k, to_diffusers=False)}": v.clone() for k, v in vsd.items()}
    back = convert_ltx2_audio_vae_to_diffusers(dict(orig_vae))
    assert back.keys() == vsd.keys() and all(torch.equal(back[k], vsd[k]) for k in vsd)
    orig_voc = {model.ltx2_audio_key(k, to_diffusers=False): v.clone() for k, v in csd.items()}
    renamed = {}
    for k, v in orig_voc.items():
        for o, d in VOCODER_RENAMES.items():
            k = k.replace(o, d)
        renamed[k] = v
    assert renamed.keys() == csd.keys()
    sd = {
        **orig_vae,
        **{f"vocoder.{k}": v for k, v in orig_voc.items()},
        "audio_vae.per_channel_statistics.channel": torch.arange(32.0),  # dropped as for the video VAE
        "audio_vae.per_channel_statistics.mean-of-stds": torch.ones(32),
        "model.diffusion_model.patchify_proj.weight": torch.zeros(4, 4),
        "vae.per_channel_statistics.mean-of-means": torch.zeros(4),
    }
    if edit:
        edit(sd)
    config = {
        "audio_vae": {"model": {"params": {"ddconfig": {"causality_axis": "height", "mel_bins": 16}}}},
        "vocoder": {"upsample_rates": [5, 4, 2], "upsample_kernel_sizes": [11, 8, 4], "resblock": "1"},
    }
    save_file(sd, file, metadata={"config": json.dumps(config)} if meta else None)
    return file


def test_audio_combined_file(audio, tmp_path):
    file = audio_combined(audio, tmp_path / "ltx-2-tiny.safetensors")
    vae, voc = model.load_ltx2_audio(file)
    folder_vae, folder_voc = model.load_ltx2_audio(audio["root"] / "repo")
    assert vae.cfg == folder_vae.cfg and voc.cfg == folder_voc.cfg
    check_audio(vae, voc, audio, "combined file")
    with pytest.raises(ValueError, match=r"upsample_rates \[6, 5, 2, 2, 2\]"):  # without metadata: ltx-core's defaults
        model.load_ltx2_vocoder(audio_combined(audio, tmp_path / "nometa.safetensors", meta=False))

    def drop_encoder(sd):
        for k in [k for k in sd if k.startswith("audio_vae.encoder.")]:
            sd.pop(k)

    dec = model.load_ltx2_audio_vae(audio_combined(audio, tmp_path / "dec.safetensors", edit=drop_encoder))
    assert not dec.cfg.encoder and not hasattr(dec, "encoder")
    with torch.no_grad():
        assert rel_err(dec.decode(audio["z"]), ref_audio(audio["vae"], z=audio["z"])) <= 1e-5
    with pytest.raises(ValueError, match="loaded without its encoder"):
        dec.encode(audio["mel"])


def test_audio_errors(audio, tmp_path):
    key = "audio_vae.decoder.up.1.block.0.conv2.conv.bias"
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.up.1.block.0.conv2.conv.bias"):
        model.load_ltx2_audio_vae(audio_combined(audio, tmp_path / "m.safetensors", edit=lambda sd: sd.pop(key)))
    key = "vocoder.resblocks.4.convs2.1.weight"
    with pytest.raises(ValueError, match=r"missing keys \(1\): resblocks.4.convs2.1.weight"):
        model.load_ltx2_vocoder(audio_combined(audio, tmp_path / "v.safetensors", edit=lambda sd: sd.pop(key)))
    vae, voc = model.load_ltx2_audio(audio["root"] / "repo")
    with pytest.raises(ValueError, match=r"^audio latents must be \[B, 8, A, 4\], got \[2, 8, 5, 3\]$"):
        vae.decode(audio["z"][..., :3])
    with pytest.raises(ValueError, match=r"^mel must be \[B, 2, T, 16\], got \[2, 1, 17, 16\]$"):
        vae.encode(audio["mel"][:, :1])
    with pytest.raises(ValueError, match=r"^mel must be \[B, C, T, M\] with C\*M = 32 .*got \[2, 2, 17, 8\]$"):
        voc(audio["mel"][..., :8])
    folder = tmp_path / "audio_vae"
    audio["vae"].save_pretrained(folder)
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, "norm_type": "group"}))
    with pytest.raises(ValueError, match=r"norm_type='group' \(only 'pixel'\)"):
        model.load_ltx2_audio_vae(folder)
    (folder / "config.json").write_text(json.dumps({**c, "base_channels": 16}))
    with pytest.raises(ValueError, match="base_channels 16 must equal latent_channels x mel_bins/4 = 32"):
        model.load_ltx2_audio_vae(folder)


def test_audio_full_size_on_meta():
    with torch.device("meta"):
        ref, rvoc = AutoencoderKLLTX2Audio(), LTX2Vocoder()  # diffusers' defaults are the 2.0 release's
    cfg = model.ltx2_audio_vae_config_from_diffusers(dict(ref.config), "config.json")
    vcfg = model.ltx2_vocoder_config_from_diffusers(dict(rvoc.config), "config.json")
    assert cfg == model.LTX2AudioVAEConfig() and cfg.features == 128 and vcfg == model.LTX2VocoderConfig()
    with torch.device("meta"):
        vae, voc = model.LTX2AudioVAE(cfg), model.LTX2Vocoder(vcfg)
    for ours, theirs in ((vae, ref), (voc, rvoc)):
        assert {model.ltx2_audio_key(k): tuple(v.shape) for k, v in ours.state_dict().items()} == {
            k: tuple(v.shape) for k, v in theirs.state_dict().items()
        }
    assert sum(p.numel() for p in vae.parameters()) == 53_248_146 == sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in voc.parameters()) == 55_592_802 == sum(p.numel() for p in rvoc.parameters())
    assert sum(p.numel() for p in vae.decoder.parameters()) == 31_915_138  # what --audio needs
    # the architecture is in the shapes (+ ltx-core's default upsample rates, the release's)
    assert model.ltx2_audio_vae_config_from_state(vae.state_dict()) == cfg
    assert model.ltx2_vocoder_config_from_state(voc.state_dict()) == vcfg
