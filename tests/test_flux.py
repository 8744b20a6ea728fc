"""model.py's FLUX.1 Kontext against diffusers (the oracle): tiny random configs in fp32, the full config on meta.

The test packs latents, builds position ids and slices the reference tokens off itself (as diffusers'
FluxKontextPipeline does, pipeline_flux_kontext.py:560-597, 663, 1052), so the code's own packing is checked too.
"""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels
import model

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402

from tiny_repos import flux_to_diffusers  # noqa: E402

# head dim 32 with BFL's axis proportions, so a BFL-format file (no config) reads back the same RoPE axes
TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)


def diffusers_tiny(seed=0, **over):
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**{**TINY, **over}).eval()
    with torch.no_grad():  # random everything so no term can hide behind an init (zero adaLN, unit norms)
        for p in ref.state_dict().values():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref


def inputs(B=2, seed=1, C=4):
    # a non-square target (latent 6x10 -> 3x5 tokens) and a reference of another size (8x4 -> 4x2 tokens)
    g = torch.Generator().manual_seed(seed)
    x, ref = torch.randn(B, C, 6, 10, generator=g), torch.randn(B, C, 8, 4, generator=g)
    ctx, pooled = torch.randn(B, 5, 24, generator=g), torch.randn(B, 20, generator=g)
    return dict(
        x=x,
        ref=ref,
        sigma=torch.tensor([0.999, 0.25])[:B],
        context=ctx,
        pooled=pooled,
        guidance=torch.tensor([2.5, 4.0])[:B],
    )


def pack(t):  # diffusers _pack_latents
    b, c, h, w = t.shape
    return t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def ids(index, h, w):  # diffusers _prepare_latent_image_ids on the packed grid, axis 0 = index
    t = torch.zeros(h, w, 3)
    t[..., 0], t[..., 1], t[..., 2] = index, torch.arange(h)[:, None], torch.arange(w)[None]
    return t.reshape(h * w, 3)


def ref_out(ref, inp, use_ref=True, guidance=True):
    x = inp["x"]
    B, C, H, W = x.shape
    hidden, img_ids = pack(x), ids(0, H // 2, W // 2)
    if use_ref:
        r = inp["ref"]
        hidden = torch.cat([hidden, pack(r)], 1)
        img_ids = torch.cat([img_ids, ids(1, r.shape[2] // 2, r.shape[3] // 2)])
    with torch.no_grad():
        v = ref(
            hidden_states=hidden,
            encoder_hidden_states=inp["context"],
            pooled_projections=inp["pooled"],
            timestep=inp["sigma"],
            img_ids=img_ids,
            txt_ids=torch.zeros(inp["context"].shape[1], 3),
            guidance=inp["guidance"] if guidance else None,
        ).sample[:, : (H // 2) * (W // 2)]
    return v.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)  # _unpack_latents


def ours(net, inp, use_ref=True, pref=None):
    with torch.no_grad():
        return net(
            inp["x"],
            inp["sigma"],
            context=inp["context"],
            pooled=inp["pooled"],
            guidance=inp["guidance"],
            ref=inp["ref"] if use_ref else None,
            pref=pref,
        )


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def bfl_converter(inner_dim):
    # diffusers' own BFL -> diffusers converter, re-executed with the tiny width: it hard-codes inner_dim = 3072
    # for the single blocks' linear1 split (single_file_utils.py:2305)
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1
    ns = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), ns)
    return ns[fn.__name__]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref = diffusers_tiny()
    root = tmp_path_factory.mktemp("flux")
    ref.save_pretrained(root / "repo" / "transformer")
    return dict(ref=ref, root=root, repo=root / "repo", inp=inputs())


@pytest.mark.parametrize("use_ref", [True, False])
def test_parity_diffusers_folder(tiny, use_ref):
    net = model.load_transformer(str(tiny["repo"]))  # repo root holding transformer/
    assert isinstance(net, model.FluxTransformer) and net.cfg.axes_dim == (4, 14, 14) and net.cfg.guidance_embed
    err = rel_err(ours(net, tiny["inp"], use_ref), ref_out(tiny["ref"], tiny["inp"], use_ref))
    print(f"folder, reference {'on' if use_ref else 'off'}: rel err {err:.2e}")
    assert err <= 1e-5


def test_parity_without_guidance_embedding(tmp_path):
    # FLUX.1 [schnell]-style (no guidance_in): guidance may be None
    ref = diffusers_tiny(seed=2, guidance_embeds=False)
    ref.save_pretrained(tmp_path)
    net = model.load_transformer(str(tmp_path))
    assert not net.cfg.guidance_embed and not hasattr(net, "guidance_in")
    inp = dict(inputs(), guidance=None)
    err = rel_err(ours(net, inp), ref_out(ref, inp, guidance=False))
    print(f"no guidance embedding: rel err {err:.2e}")
    assert err <= 1e-5


def test_bfl_single_file(tiny):
    dsd = {k: v.clone() for k, v in tiny["ref"].state_dict().items()}
    cfg = model.flux_config_from_diffusers(dict(tiny["ref"].config))
    orig = model.flux_from_diffusers(dsd, cfg)  # our keys ARE BFL's keys
    assert not any(k.startswith("<diffusers>") for k in orig)
    back = bfl_converter(cfg.hidden)({k: v.clone() for k, v in orig.items()})
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    mine = flux_to_diffusers(orig, cfg)
    assert mine.keys() == dsd.keys() and all(torch.equal(mine[k], dsd[k]) for k in dsd)
    assert model.flux_config_from_state(orig) == cfg
    # BFL's flux1-kontext-dev.safetensors has bare keys; some repacks add model.diffusion_model. (+ a VAE)
    save_file(orig, tiny["root"] / "bare.safetensors")
    bundle = {f"model.diffusion_model.{k}": v for k, v in orig.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    save_file(bundle, tiny["root"] / "prefixed.safetensors")
    expect = ref_out(tiny["ref"], tiny["inp"])
    for f in ("bare.safetensors", "prefixed.safetensors"):
        net = model.load_transformer(str(tiny["root"] / f))
        err = rel_err(ours(net, tiny["inp"]), expect)
        print(f"{f}: rel err {err:.2e}")
        assert net.cfg == cfg and err <= 1e-5


def test_tiny_preset_reads_back_from_a_bare_state_dict(tmp_path):
    # how train.py caches the tiny base: net.state_dict() with no config; the shapes must give the preset back
    cfg = model.FluxConfig(**model.FLUX_PRESETS["flux-tiny"])
    net = model.FluxTransformer(cfg)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "tiny.safetensors")
    assert model.load_transformer(str(tmp_path / "tiny.safetensors")).cfg == cfg
    x = torch.randn(2, 12, 16, 16)  # a 32x32 RGB image, space-to-depth 2x2: 64 tokens of 48 features
    v = net(x, torch.tensor([0.5, 0.1]), context=torch.randn(2, 3, 64), pooled=torch.randn(2, 64), guidance=3.5)
    assert v.shape == x.shape


def test_pref_none_is_base_bit_exact(tiny):
    base = model.load_transformer(str(tiny["repo"]))
    cond = model.load_transformer(str(tiny["repo"]), pref_dim=2)
    inp = tiny["inp"]
    assert torch.equal(ours(base, inp), ours(cond, inp))
    pref = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    y = ours(cond, inp, pref=pref)
    assert y.shape == inp["x"].shape and not torch.equal(y, ours(base, inp))  # pref_mlp acts
    with pytest.raises(ValueError, match=r"pref must have shape \[2, 2\]"):
        ours(cond, inp, pref=pref[:, :1])
    with pytest.raises(ValueError, match="no preference input"):
        ours(base, inp, pref=pref)


def test_slider_reaches_image_tokens_only():
    torch.manual_seed(0)
    net = model.FluxTransformer(model.FluxConfig(**model.FLUX_PRESETS["flux-tiny"], pref_dim=2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    D, L = net.cfg.hidden, 3
    x, ref = torch.randn(2, 12, 4, 6), torch.randn(2, 12, 6, 4)
    kw = dict(context=torch.randn(2, L, 64), pooled=torch.randn(2, 64), guidance=torch.tensor([2.5, 2.5]), ref=ref)
    sigma, pref = torch.tensor([0.5, 0.9]), torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    seen = []
    hook = net.double_blocks[0].register_forward_hook(lambda mod, i, o: seen.append([t.clone() for t in o]))
    with torch.no_grad():
        y0 = net(x, sigma, pref=pref, **kw)
        net.pref_slider.mlp[-1].bias.add_(0.5)  # another m(w), same pref_mlp
        y1 = net(x, sigma, pref=pref, **kw)
    hook.remove()
    assert not torch.allclose(y0, y1)
    (txt0, img0), (txt1, img1) = seen
    assert torch.equal(txt0, txt1) and not torch.allclose(img0, img1)  # the text stream never sees m
    # a single-stream block adds gate * m to the image part of [text, image] tokens only
    blk, vec, m = net.single_blocks[0], torch.randn(2, D), torch.randn(2, D)
    joint = torch.randn(2, L + 20, D)
    cos, sin = model.flux_rope(torch.cat([torch.zeros(L, 3), model.flux_ids(0, 4, 5)]), net.cfg.axes_dim, 10000)
    with torch.no_grad():
        a, b = blk(joint, vec, cos, sin), blk(joint, vec, cos, sin, m, (L, L + 20))
        gate = blk.modulation(vec).gate_msa
    assert torch.equal(a[:, :L], b[:, :L])
    torch.testing.assert_close(b[:, L:] - a[:, L:], (gate * m)[:, None].expand(-1, 20, -1), atol=1e-5, rtol=1e-5)


def test_full_size_on_meta():
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1-dev's shapes
    dcfg = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    cfg = model.flux_config_from_diffusers(dcfg)
    assert cfg == model.FluxConfig(**model.FLUX_PRESETS["flux-dev"])
    with torch.device("meta"):
        net = model.FluxTransformer(cfg)
    assert model.flux_config_from_state(net.state_dict()) == cfg
    ours_shapes = {k: tuple(v.shape) for k, v in flux_to_diffusers(net.state_dict(), cfg).items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    n = sum(p.numel() for p in net.parameters())
    assert n == 11_901_408_320 == sum(p.numel() for p in ref.parameters())
    assert len(net.state_dict()) == 780 and len(ref.state_dict()) == 1160  # diffusers single_file_utils.py:2294-2488


def test_load_errors(tiny, tmp_path):
    cfg = model.flux_config_from_diffusers(dict(tiny["ref"].config))
    orig = model.flux_from_diffusers(tiny["ref"].state_dict(), cfg)

    def broken(edit, name):
        sd = dict(orig)
        edit(sd)
        save_file(sd, tmp_path / name)
        return str(tmp_path / name)

    with pytest.raises(ValueError, match=r"missing keys \(1\): single_blocks.1.linear2.bias"):
        model.load_transformer(broken(lambda sd: sd.pop("single_blocks.1.linear2.bias"), "m.safetensors"))
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): double_blocks.0.txt_attn.norm.key_norm.scale"):
        model.load_transformer(
            broken(
                lambda sd: sd.__setitem__("double_blocks.0.txt_attn.norm.key_norm.scale", torch.ones(16)),
                "s.safetensors",
            )
        )
    with pytest.raises(ValueError, match="Fill/Depth/Canny"):  # channel-concat variants: img_in wider than the output
        model.load_transformer(broken(lambda sd: sd.__setitem__("img_in.weight", torch.zeros(64, 48)), "f.safetensors"))
    # a diffusers folder: unsupported options fail at load time; an unconsumed tensor is reported
    folder = tmp_path / "d"
    tiny["ref"].save_pretrained(folder)
    c = json.loads((folder / "config.json").read_text())
    for bad, msg in [
        ({"use_rope_v2": True}, "unsupported FluxTransformer2DModel config options: \\['use_rope_v2'\\]"),
        ({"in_channels": 64, "out_channels": 16}, "Fill/Depth/Canny"),
        ({"patch_size": 2}, "unsupported patch_size 2"),
    ]:
        (folder / "config.json").write_text(json.dumps({**c, **bad}))
        with pytest.raises(ValueError, match=msg):
            model.load_transformer(str(folder))
    (folder / "config.json").write_text(json.dumps(c))
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    sd["single_transformer_blocks.0.attn.to_out.0.weight"] = torch.zeros(1)
    del sd["transformer_blocks.1.attn.add_k_proj.bias"]
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"(?s)missing keys \(1\): double_blocks.1.txt_attn.qkv.bias.*"
        r"unexpected keys \(3\).*single_transformer_blocks.0.attn.to_out.0.weight",
    ):
        model.load_transformer(str(folder))


def test_bad_inputs(tiny):
    net, inp = model.load_transformer(str(tiny["repo"])), tiny["inp"]
    for bad, msg in [
        (dict(context=inp["context"][..., :8]), r"context must be \[B, L, 24\]"),
        (dict(x=inp["x"][:, :, :5]), r"x must be an unpacked latent \[B, 4, h, w\] with h, w even"),
        (dict(ref=inp["ref"][:, :3]), r"ref must be an unpacked latent \[B, 4, h, w\]"),
        (dict(pooled=inp["pooled"][:, :4]), r"pooled must be \[B, 20\]"),
        (dict(guidance=None), "guidance-distilled"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ours(net, {**inp, **bad})


def test_lora_export_loads_in_diffusers(tiny, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    net = model.load_transformer(str(tiny["repo"]), pref_dim=2)
    names = model.add_lora(net, rank=4, alpha=8)
    assert len(names) == 2 * 4 + 2 * 2  # per double block 2 qkv + 2 proj; per single block linear1, linear2
    assert net.single_blocks[0].linear1.lora_splits == (64, 64, 64, 256)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for p in model.adapter_state(net).values():
            p.copy_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    model.export_lora_diffusers(net, path)
    exported = load_file(path)
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in exported
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_A.weight" in exported
    pipe = FluxKontextPipeline(
        transformer=diffusers_tiny(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.load_lora_weights(path)
    model.merge_lora(net)
    got = ours(net, tiny["inp"])  # merged, pref=None: what a diffusers user gets
    err = rel_err(got, ref_out(pipe.transformer, tiny["inp"]))
    print(f"LoRA export through FluxKontextPipeline.load_lora_weights: rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(got, ref_out(tiny["ref"], tiny["inp"])) > 1e-3  # the LoRA matters


def test_kernels_on_equals_off():
    torch.manual_seed(0)
    net = model.FluxTransformer(model.FluxConfig(**model.FLUX_PRESETS["flux-tiny"], pref_dim=2))
    with torch.no_grad():  # random everything, so zero-inits (slider, adaLN) cannot hide a term
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(2, 12, 4, 6, generator=g), torch.randn(2, 12, 6, 4, generator=g)
    kw = dict(
        context=torch.randn(2, 5, 64, generator=g),
        pooled=torch.randn(2, 64, generator=g),
        guidance=torch.tensor([2.5, 3.0]),
        pref=torch.tensor([[0.2, 0.8], [1.0, 0.0]]),
    )
    w, sigma = torch.randn(2, 12, 4, 6, generator=g), torch.tensor([0.9, 0.3])

    def run(backend):
        kernels.set_backend(backend)
        net.zero_grad(set_to_none=True)
        xi, ri = x.clone().requires_grad_(), ref.clone().requires_grad_()
        out = net(xi, sigma, ref=ri, **kw)
        (out * w).sum().backward()
        return out.detach(), xi.grad, ri.grad, {n: p.grad for n, p in net.named_parameters()}

    try:
        t = run("triton")
    finally:
        kernels.set_backend("torch")
    r = run("torch")
    assert r[0].abs().max() > 0.1 and r[2].abs().max() > 0  # live, and the reference tokens matter
    for a, b in zip(t[:3], r[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert t[3].keys() == r[3].keys()
    for n in r[3]:
        assert r[3][n] is not None and t[3][n] is not None, n
        torch.testing.assert_close(t[3][n], r[3][n], atol=1e-5 * (1 + r[3][n].abs().max().item()), rtol=1e-4, msg=n)


def test_grad_checkpointing_and_adapter_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = model.FluxTransformer(model.FluxConfig(**model.FLUX_PRESETS["flux-tiny"], pref_dim=2))
    model.add_lora(net, rank=4, alpha=8)
    with torch.no_grad():
        for p in model.adapter_state(net).values():
            p.copy_(torch.randn_like(p) * 0.1)
    x, ref, sigma = torch.randn(2, 12, 4, 6), torch.randn(2, 12, 2, 4), torch.tensor([0.5, 0.9])
    kw = dict(
        context=torch.randn(2, 3, 64),
        pooled=torch.randn(2, 64),
        guidance=torch.tensor([2.5, 3.5]),
        ref=ref,
        pref=torch.tensor([[0.3, 0.7], [1.0, 0.0]]),
    )
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.grad_ckpt = ckpt
        net(x, sigma, **kw).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    # adapter files carry the FLUX config (tuples read back as lists) and the fused splits
    path = str(tmp_path / "a.safetensors")
    model.save_adapters(net, path, objectives=["edit", "keep"])
    base = {k: v for k, v in net.state_dict().items() if not model.is_adapter_param(k)}
    fresh = model.build(model.FluxTransformer, net.cfg, base)  # strict on the base, fresh preference modules
    model.load_adapters(fresh, path, objectives=["edit", "keep"])
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, **kw), net(x, sigma, **kw))
