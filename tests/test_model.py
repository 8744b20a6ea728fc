"""model.py against diffusers (the oracle): tiny random SD3.5 configs in fp32, full configs on meta."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

from tiny_repos import sd3_to_diffusers  # noqa: E402

TINY = {  # (medium style: MMDiT-X dual attention + qk RMSNorm; large style)
    "medium": dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    "large": dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    ),
}


def diffusers_tiny(style, seed=0):
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**TINY[style]).eval()
    with torch.no_grad():  # random everything (incl. the pos table) so no term can hide behind an init
        for p in ref.state_dict().values():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref


def inputs(B=2, h=12, w=20, seed=1):  # non-square latent, batch > 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    ctx, pooled = torch.randn(B, 7, 32, generator=g), torch.randn(B, 24, generator=g)
    sigma = torch.tensor([0.999, 0.25])[:B]
    return x, sigma, ctx, pooled


def ref_out(ref, x, sigma, ctx, pooled):
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * sigma).sample


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("style", ["medium", "large"])
def test_parity_diffusers_folder(style, tmp_path):
    ref = diffusers_tiny(style)
    ref.save_pretrained(tmp_path / "transformer")
    net = model.load_transformer(str(tmp_path))  # repo root holding transformer/
    assert net.cfg.dual_attention_layers == tuple(TINY[style].get("dual_attention_layers", ()))
    x, sigma, ctx, pooled = inputs()
    with torch.no_grad():
        out = net(x, sigma, ctx, pooled)
    assert rel_err(out, ref_out(ref, x, sigma, ctx, pooled)) <= 1e-5


def test_parity_sharded_folder(tmp_path):
    ref = diffusers_tiny("medium")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    net = model.load_transformer(str(tmp_path))
    x, sigma, ctx, pooled = inputs(B=2, h=16, w=8)
    with torch.no_grad():
        assert rel_err(net(x, sigma, ctx, pooled), ref_out(ref, x, sigma, ctx, pooled)) <= 1e-5


@pytest.mark.parametrize("style", ["medium", "large"])
def test_original_single_file(style, tmp_path):
    ref = diffusers_tiny(style)
    dsd = {k: v.clone() for k, v in ref.state_dict().items()}
    orig = model.sd3_from_diffusers(dsd, TINY[style]["num_layers"])  # inverts diffusers' converter
    assert not any(k.startswith("<diffusers>") for k in orig)
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in orig.items()})
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    assert sd3_to_diffusers(orig, TINY[style]["num_layers"]).keys() == dsd.keys()
    # a Stability-style file: prefixed transformer plus a bundled VAE / text-encoder tensor
    bundle = {f"model.diffusion_model.{k}": v for k, v in orig.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    bundle["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = torch.zeros(2)
    save_file(bundle, tmp_path / "sd3.5.safetensors")
    save_file(orig, tmp_path / "bare.safetensors")
    x, sigma, ctx, pooled = inputs()
    expect = ref_out(ref, x, sigma, ctx, pooled)
    for f in ("sd3.5.safetensors", "bare.safetensors"):
        net = model.load_transformer(str(tmp_path / f))
        with torch.no_grad():
            assert rel_err(net(x, sigma, ctx, pooled), expect) <= 1e-5


def test_pref_none_is_base_bit_exact(tmp_path):
    diffusers_tiny("medium").save_pretrained(tmp_path)
    base, cond = model.load_transformer(str(tmp_path)), model.load_transformer(str(tmp_path), pref_dim=3)
    x, sigma, ctx, pooled = inputs()
    with torch.no_grad():
        assert torch.equal(base(x, sigma, ctx, pooled), cond(x, sigma, ctx, pooled))
        pref = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
        y = cond(x, sigma, ctx, pooled, pref)
        assert y.shape == x.shape and not torch.equal(y, base(x, sigma, ctx, pooled))  # pref_mlp acts
        with pytest.raises(ValueError, match=r"pref must have shape \[2, 3\]"):
            cond(x, sigma, ctx, pooled, pref[:, :2])
        with pytest.raises(ValueError, match="no preference input"):
            base(x, sigma, ctx, pooled, pref)


def test_slider_residual_reaches_image_stream_only():
    cfg = model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2)
    torch.manual_seed(0)
    net = model.SD3Transformer(cfg)
    x, ctx, pooled = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 64), torch.randn(2, 64)
    pref, sigma = torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        nn_last = net.pref_slider.mlp[-1]
        y0 = net(x, sigma, ctx, pooled, pref)
        nn_last.bias.fill_(0.1)  # a non-zero m(w) must change the output ...
        y1 = net(x, sigma, ctx, pooled, pref)
    assert not torch.allclose(y0, y1)
    # ... through the image tokens only: the context stream never sees m
    seen = {}
    blk = net.joint_blocks[0]
    hook = blk.context_block.mlp.register_forward_hook(lambda m, i, o: seen.setdefault("c", o.clone()))
    with torch.no_grad():
        net(x, sigma, ctx, pooled, pref)
        c1 = seen.pop("c")
        nn_last.bias.zero_()
        net(x, sigma, ctx, pooled, pref)
    hook.remove()
    assert torch.equal(c1, seen["c"])


def full_diffusers(style):
    cfg = dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        attention_head_dim=64,
        qk_norm="rms_norm",
    )
    if style == "medium":
        cfg.update(
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
        )
    else:
        cfg.update(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192)
    with torch.device("meta"):
        return SD3Transformer2DModel(**cfg), cfg


@pytest.mark.parametrize("style,params", [("medium", 2.243e9), ("large", 8.057e9)])
def test_full_size_on_meta(style, params):
    ref, dcfg = full_diffusers(style)
    cfg = model.sd3_config_from_diffusers(dcfg)
    assert cfg == model.SD3Config(**model.SD3_PRESETS[f"sd35-{style}"])
    with torch.device("meta"):
        net = model.SD3Transformer(cfg)
    ours = {k: tuple(v.shape) for k, v in sd3_to_diffusers(net.state_dict(), cfg.depth).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - params) / params < 5e-4, n
    assert net.pos_embed.shape == (1, cfg.pos_embed_max**2, cfg.hidden)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        model.load_transformer(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither a diffusers model folder"):
        model.load_transformer(str(tmp_path))
    ref = diffusers_tiny("large")
    orig = model.sd3_from_diffusers(ref.state_dict(), 2)
    good = tmp_path / "good.safetensors"
    save_file(orig, good)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="trunc.safetensors.*truncated or corrupt"):
        model.load_transformer(str(trunc))

    def broken(edit, name):
        sd = dict(orig)
        edit(sd)
        save_file(sd, tmp_path / name)
        return str(tmp_path / name)

    with pytest.raises(ValueError, match=r"missing keys \(1\): joint_blocks.0.x_block.mlp.fc2.bias"):
        model.load_transformer(broken(lambda sd: sd.pop("joint_blocks.0.x_block.mlp.fc2.bias"), "m.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): joint_blocks.0.x_block.extra.weight"):
        model.load_transformer(
            broken(lambda sd: sd.__setitem__("joint_blocks.0.x_block.extra.weight", torch.zeros(2)), "u.safetensors")
        )
    with pytest.raises(ValueError, match=r"mis-shaped keys \(1\): context_embedder.bias"):
        model.load_transformer(
            broken(lambda sd: sd.__setitem__("context_embedder.bias", torch.zeros(5)), "s.safetensors")
        )
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        model.load_transformer(str(tmp_path / "junk.safetensors"))
    # unsupported diffusers options fail at load time
    ref.save_pretrained(tmp_path / "d")
    cfgp = tmp_path / "d" / "config.json"
    c = json.loads(cfgp.read_text())
    cfgp.write_text(json.dumps({**c, "qk_norm": "layer_norm"}))
    with pytest.raises(ValueError, match="unsupported qk_norm"):
        model.load_transformer(str(tmp_path / "d"))
    cfgp.write_text(json.dumps({**c, "use_pos_embed_v2": True}))
    with pytest.raises(ValueError, match="unsupported SD3Transformer2DModel config options"):
        model.load_transformer(str(tmp_path / "d"))
    # a diffusers tensor our mapping does not consume is reported, not dropped
    cfgp.write_text(json.dumps(c))
    sd = load_file(tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    sd["transformer_blocks.0.attn.to_q.lora_magnitude"] = torch.zeros(1)
    save_file(sd, tmp_path / "d" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys.*to_q.lora_magnitude"):
        model.load_transformer(str(tmp_path / "d"))


def lora_net(tmp_path, pref_dim=2, seed=3):
    ref = diffusers_tiny("medium")
    ref.save_pretrained(tmp_path / "base")
    net = model.load_transformer(str(tmp_path / "base"), pref_dim=pref_dim)
    names = model.add_lora(net, rank=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for n, p in model.adapter_state(net).items():
            p.copy_(torch.randn_like(p) * 0.1)
    return ref, net, names


def test_lora_trainable_set_and_identity_start(tmp_path):
    ref = diffusers_tiny("medium")
    ref.save_pretrained(tmp_path)
    net = model.load_transformer(str(tmp_path), pref_dim=2)
    x, sigma, ctx, pooled = inputs()
    with torch.no_grad():
        before = net(x, sigma, ctx, pooled)
    names = model.add_lora(net)  # default r=32, alpha=64 on both streams' attention projections
    assert "joint_blocks.0.x_block.attn.qkv" in names and "joint_blocks.0.context_block.attn.proj" in names
    assert not any("attn2" in n for n in names)  # reference targets attn.*, not MMDiT-X's attn2
    with torch.no_grad():
        assert torch.equal(net(x, sigma, ctx, pooled), before)  # B = 0 at init
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(model.adapter_state(net)) and any(n.startswith("pref_slider.") for n in trainable)
    net(x, sigma, ctx, pooled, torch.tensor([[0.5, 0.5], [0.1, 0.9]])).square().mean().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if n not in trainable)
    assert net.joint_blocks[0].x_block.attn.qkv.lora_B.grad.abs().sum() > 0  # A gets none while B = 0


def test_adapter_save_load_roundtrip(tmp_path):
    _, net, _ = lora_net(tmp_path)
    x, sigma, ctx, pooled = inputs()
    pref = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    with torch.no_grad():
        want = net(x, sigma, ctx, pooled, pref)
    path = str(tmp_path / "a.safetensors")
    model.save_adapters(net, path, objectives=["photo", "sketch"])
    meta = model.read_adapter_meta(path)
    assert meta["backbone"] == "sd35" and meta["objectives"] == ["photo", "sketch"] and meta["config"]["pref_dim"] == 2
    fresh = model.load_transformer(str(tmp_path / "base"), pref_dim=2)
    model.load_adapters(fresh, path, objectives=["photo", "sketch"])
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, ctx, pooled, pref), want)
    # refused, naming both sides: another objective count, other objectives, another backbone, another base
    with pytest.raises(ValueError, match=r"adapter for 2 objectives \['photo', 'sketch'\], but the network has 3"):
        model.load_adapters(model.load_transformer(str(tmp_path / "base"), pref_dim=3), path)
    with pytest.raises(ValueError, match=r"objectives \['photo', 'sketch'\], asked for \['a', 'b'\]"):
        model.load_adapters(model.load_transformer(str(tmp_path / "base"), pref_dim=2), path, objectives=["a", "b"])
    other = model.load_transformer(str(tmp_path / "base"), pref_dim=2)
    other.name = "flux-kontext"
    with pytest.raises(ValueError, match="adapter of backbone 'sd35', but the network is 'flux-kontext'"):
        model.load_adapters(other, path)
    other = model.load_transformer(str(tmp_path / "base"), pref_dim=2)
    other.cfg = dataclasses.replace(other.cfg, pos_embed_max=32)  # same widths, another base config
    with pytest.raises(ValueError, match="another base model: pos_embed_max: adapter 16 vs network 32"):
        model.load_adapters(other, path)
    with pytest.raises(ValueError, match="not a ParetoSlider adapter"):
        model.load_adapters(fresh, str(tmp_path / "base" / "diffusion_pytorch_model.safetensors"))


def test_lora_export_loads_in_diffusers(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    ref, net, _ = lora_net(tmp_path)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    model.export_lora_diffusers(net, path)
    pipe = StableDiffusion3Pipeline(
        transformer=ref,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.load_lora_weights(path)
    model.merge_lora(net)
    x, sigma, ctx, pooled = inputs()
    with torch.no_grad():
        ours = net(x, sigma, ctx, pooled)  # merged, pref=None: what a diffusers user gets
    assert rel_err(ours, ref_out(pipe.transformer, x, sigma, ctx, pooled)) <= 1e-5
    assert rel_err(ours, ref_out(diffusers_tiny("medium"), x, sigma, ctx, pooled)) > 1e-3  # the LoRA matters


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    net = model.SD3Transformer(model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2))
    model.add_lora(net, rank=4, alpha=8)
    x, ctx, pooled = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 64), torch.randn(2, 64)
    pref, sigma = torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0.5, 0.9])
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.grad_ckpt = ckpt
        net(x, sigma, ctx, pooled, pref).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_lora_unequal_splits():
    # a fused projection of unequal parts (FLUX's single-block linear1: q | k | v | mlp-in) gets one independent
    # adapter per part: y = W x + b + s * [B_j A_j x]_j, and merging folds exactly that into W
    torch.manual_seed(0)
    lin = model.Linear(6, 4 + 4 + 4 + 16)
    lin.add_lora(rank=3, alpha=6, splits=(4, 4, 4, 16))
    with torch.no_grad():
        lin.lora_B.copy_(torch.randn_like(lin.lora_B))
    x = torch.randn(5, 6, dtype=torch.float64)
    lin = lin.double()
    A, B = lin.lora_A, lin.lora_B
    want = (
        x @ lin.weight.T
        + lin.bias
        + 2.0
        * torch.cat(
            [
                x @ A[3 * j : 3 * j + 3].T @ B[o : o + n].T
                for j, (o, n) in enumerate([(0, 4), (4, 4), (8, 4), (12, 16)])
            ],
            -1,
        )
    )
    with torch.no_grad():
        torch.testing.assert_close(lin(x), want, rtol=1e-12, atol=1e-12)
        model.merge_lora(lin)
        torch.testing.assert_close(lin(x), want, rtol=1e-12, atol=1e-12)
    # add_lora reads the fractions from the backbone's table
    net = model.SD3Transformer(model.SD3Config(**model.SD3_PRESETS["sd35-tiny"]))
    model.add_lora(net, rank=2, alpha=4)
    qkv = net.joint_blocks[0].x_block.attn.qkv
    assert qkv.lora_splits == (128, 128, 128) and qkv.lora_A.shape == (6, 128) and qkv.lora_B.shape == (384, 2)
    assert net.joint_blocks[0].x_block.attn.proj.lora_splits == (128,)


def test_bf16_base_fp32_adapters_compute_in_bf16():
    # the precision policy: a bf16 base with fp32 masters (LoRA A / B, both preference modules) computes in bf16, saves
    # no fp32 activation for backward, and the masters' gradients arrive in fp32; pref=None is still the base, bit
    # for bit
    torch.manual_seed(0)
    net = model.build(
        model.SD3Transformer, model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2), dtype=torch.bfloat16
    )
    model.add_lora(net, rank=4, alpha=8)
    adapters = model.adapter_state(net)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    assert {p.dtype for n, p in net.named_parameters() if n not in adapters} == {torch.bfloat16}
    with torch.no_grad():
        for p in adapters.values():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = (
        torch.randn(2, 3, 32, 32, generator=g),
        torch.randn(2, 5, 64, generator=g),
        torch.randn(2, 64, generator=g),
    )
    pref, sigma = torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0.5, 0.9])  # fp32 inputs: the net casts them
    v = net(x, sigma, ctx, pooled, pref)
    assert v.dtype == torch.bfloat16
    v.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())
    # against the same network in fp32: one bf16 computation apart
    ref = model.build(model.SD3Transformer, net.cfg)
    model.add_lora(ref, rank=4, alpha=8)
    ref.load_state_dict({k: t.float() for k, t in net.state_dict().items()})
    assert rel_err(v.float(), ref(x, sigma, ctx, pooled, pref).detach()) < 0.03
    with torch.no_grad():
        model.set_lora_enabled(net, False)
        base = net(x, sigma, ctx, pooled)
        net.pref_mlp = net.pref_slider = None
        net.cfg = dataclasses.replace(net.cfg, pref_dim=0)
        assert torch.equal(base, net(x, sigma, ctx, pooled))


def test_lora_computes_in_the_input_dtype():
    # a bf16 layer with fp32 LoRA masters on a fused projection: bf16 out, the fp64 formula within bf16 rounding, only
    # bf16 tensors of the input's size saved for backward (no fp32 copy of the activation), fp32 gradients for A and B
    torch.manual_seed(0)
    lin = model.Linear(64, 3 * 32).to(torch.bfloat16)
    lin.add_lora(rank=4, alpha=8, splits=(32, 32, 32))
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(2, 50, 64).to(torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and lin.lora_A.dtype == lin.lora_B.dtype == torch.float32
    assert any(t.data_ptr() == x.data_ptr() for t in saved) and all(
        t.dtype == torch.bfloat16 for t in saved if t.numel() >= x.numel()
    )
    A, B, W, b = (t.double() for t in (lin.lora_A, lin.lora_B, lin.weight, lin.bias))
    want = (
        x.double() @ W.T
        + b
        + 2.0 * torch.cat([x.double() @ A[4 * j : 4 * j + 4].T @ B[32 * j : 32 * j + 32].T for j in range(3)], -1)
    )
    assert rel_err(y.double(), want) < 1e-2
    y.float().square().sum().backward()
    assert lin.lora_A.grad.dtype == lin.lora_B.grad.dtype == torch.float32 and lin.lora_A.grad.abs().sum() > 0


def test_compiled_blocks_equal_eager():
    # --compile: regional torch.compile (each block on its own) gives the eager outputs and adapter gradients within
    # fp32 tolerance, and blocks of one kind share one compiled graph: of 4 blocks, the first (its text input carries
    # no graph yet), the middle two (one graph) and the last (no context MLP): 3 graphs
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = model.SD3Config(**{**model.SD3_PRESETS["sd35-tiny"], "depth": 4, "dual_attention_layers": ()}, pref_dim=2)
    net = model.build(model.SD3Transformer, cfg)
    model.add_lora(net, rank=4, alpha=8)
    with torch.no_grad():
        for p in model.adapter_state(net).values():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = (
        torch.randn(2, 3, 32, 32, generator=g),
        torch.randn(2, 5, 64, generator=g),
        torch.randn(2, 64, generator=g),
    )
    pref, sigma = torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0.5, 0.9])
    weight = torch.randn(2, 3, 32, 32, generator=g)

    def step():
        net.zero_grad(set_to_none=True)
        v = net(x, sigma, ctx, pooled, pref)
        (v * weight).sum().backward()
        return v.detach(), {n: p.grad for n, p in model.adapter_state(net).items()}

    eager = step()
    net.compile_blocks()
    torch._dynamo.utils.counters.clear()
    compiled = step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert rel_err(compiled[0], eager[0]) < 1e-5
    for n, ge in eager[1].items():
        assert rel_err(compiled[1][n], ge) < 1e-4, n
    torch._dynamo.reset()
