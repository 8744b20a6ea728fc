"""The backbone contract, over the registry: every row of model.BACKBONES (and the layers keyed alike) keeps what the
method relies on. A fourth backbone that forgets any of it fails here; the toy backbones at the end show that it does.

For each backbone, on its tiny net with random adapters: pref=None is the base network bit for bit; the slider vector
m alone (pref_mlp zeroed) changes the output, so it reaches the blocks; every lora_targets entry adapts a module; the
repeated blocks are what Backbone.blocks() lists; gradient checkpointing gives the same gradients."""

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn

import model
import sample
import train


def inputs(name, cfg, B=2, seed=0):
    # one micro-batch of the backbone's tiny net: its latents (positional) and conditioning (keywords)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    if name == "sd35":
        return [r(B, cfg.in_channels, 16, 16)], dict(context=r(B, 5, cfg.context_dim), pooled=r(B, cfg.pooled_dim))
    if name == "flux-kontext":
        C = cfg.in_channels // 4
        ref = r(B, C, 4, 4)
        return [r(B, C, 8, 8)], dict(context=r(B, 5, cfg.context_dim), pooled=r(B, cfg.pooled_dim),
                                     guidance=torch.full((B,), 2.5), ref=ref)  # fmt: skip
    if name == "ltx2":
        mel = cfg.audio_in_channels // cfg.audio_channels
        video, audio = r(B, cfg.in_channels, 2, 2, 3), r(B, cfg.audio_channels, 3, mel)
        return [video, audio], dict(context=r(B, 4, cfg.caption_channels), context_audio=r(B, 4, cfg.caption_channels))
    raise KeyError(f"no tiny inputs for backbone {name!r}: add them here")


def check_contract(cls, cfg, latents, cond):
    """The contract, asserted. cls(cfg) with cfg.pref_dim == 2 is the backbone with its preference paths."""
    torch.manual_seed(0)
    net = cls(cfg)
    assert isinstance(net, model.Backbone)
    assert hasattr(net, "pref_mlp") and hasattr(net, "pref_slider"), "init_preference() was not called"
    assert net.blocks(), "no repeated blocks in an nn.ModuleList (Backbone.blocks: compile, checkpointing, FSDP)"
    sigma, pref = torch.tensor([0.3, 0.8]), torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    out = lambda o: torch.cat([t.flatten() for t in (o if isinstance(o, tuple) else (o,))])
    with torch.no_grad():
        # pref=None: the base network itself, bit for bit (the KL reference and the parity tests rely on it)
        base = cls(replace(cfg, pref_dim=0))
        base.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("pref_")})
        assert torch.equal(out(net(*latents, sigma, pref=None, **cond)), out(base(*latents, sigma, **cond)))
        # the slider vector alone (pref_mlp's output zeroed) moves the output: m reaches the blocks
        for p in net.pref_mlp.parameters():
            p.zero_()
        before = out(net(*latents, sigma, pref=pref, **cond))
        nn.init.normal_(net.pref_slider.mlp[-1].weight, std=0.5)
        after = out(net(*latents, sigma, pref=pref, **cond))
        assert torch.equal(before, out(base(*latents, sigma, **cond))), "with m = 0 and pref_mlp = 0: the base"
        assert (after - before).abs().max() > 1e-4, "the slider vector m does not reach the blocks"
    # every LoRA target adapts at least one module
    hits = {t: [n for n in model.add_lora(net, 2, 4) if n == t or n.endswith("." + t)] for t in net.lora_targets}
    assert all(hits.values()), f"lora_targets that match no module: {[t for t, h in hits.items() if not h]}"
    # gradient checkpointing: the same gradients
    with torch.no_grad():
        for p in model.adapter_state(net).values():
            p.add_(torch.randn_like(p) * 0.01)
    grads = []
    for ckpt in (False, True):
        net.zero_grad(set_to_none=True)
        net.grad_ckpt = ckpt
        out(net(*latents, sigma, pref=pref, **cond)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter_state(net).items()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_the_layers_list_the_same_backbones():
    # model.BACKBONES is the table; sample.py's loaders and train.py's setups are keyed alike
    assert set(model.BACKBONES) == set(sample.LOADERS) == set(train.BACKBONES)
    for name, spec in model.BACKBONES.items():
        assert spec.cls.name == name and spec.tiny in spec.presets and spec.config is type(spec.config())


@pytest.mark.parametrize("name", list(model.BACKBONES))
def test_every_backbone_keeps_the_contract(name):
    spec = model.BACKBONES[name]
    cfg = spec.config(**spec.presets[spec.tiny], pref_dim=2)
    check_contract(spec.cls, cfg, *inputs(name, cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Toy backbones: one keeps the contract, two break it the ways the issue names; the check catches both


@dataclass
class ToyConfig:
    hidden: int = 8
    depth: int = 2
    pref_dim: int = 0


class ToyBlock(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = model.Linear(D, D)
        self.ada = model.Linear(D, 3 * D)

    def forward(self, x, c, m=None):
        mod = model.chunks(self.ada(c), model.MOD[:3])
        x = x + mod.gate_msa[:, None] * self.attn.qkv(x * (1 + mod.scale_msa[:, None]) + mod.shift_msa[:, None])
        return x if m is None else x + m[:, None]


class Toy(model.Backbone):
    name = "toy"
    lora_targets = {"attn.qkv": (1,)}
    forgets = None  # "m" or "init_preference"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.inp, self.t = model.Linear(3, cfg.hidden), model.Linear(256, cfg.hidden)
        self.blocks_ = nn.ModuleList(ToyBlock(cfg.hidden) for _ in range(cfg.depth))
        self.out = model.Linear(cfg.hidden, 3)
        if self.forgets != "init_preference":
            self.init_preference()

    def forward(self, x, sigma, pref=None):
        h, c = self.inp(x), self.t(model.timestep_embedding(1000 * sigma))
        dc, m = self.preference(pref, x.shape[0], h.dtype) if self.cfg.pref_dim and hasattr(self, "pref_mlp") else (
            None, None)  # fmt: skip
        c = c if dc is None else c + dc
        for blk in self.blocks_:
            h = self.run(blk, h, c, None if self.forgets == "m" else m)
        return self.out(h)


@pytest.mark.parametrize("forgets", [None, "m", "init_preference"])
def test_a_backbone_that_breaks_the_contract_fails_it(forgets):
    toy = type("Toy", (Toy,), dict(forgets=forgets))
    x = [torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))]
    if forgets is None:
        check_contract(toy, ToyConfig(pref_dim=2), x, {})
    else:
        with pytest.raises(AssertionError, match="slider vector m does not reach|init_preference"):
            check_contract(toy, ToyConfig(pref_dim=2), x, {})
