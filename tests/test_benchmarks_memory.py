# benchmarks/memory.py: the live-bytes tracker against independent counts, the meta device against real CPU tensors,
# and the full-size counts against model.py's.
import importlib.util
import math
import os
from contextlib import nullcontext

import pytest
import torch

import kernels
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("benchmarks_memory", os.path.join(ROOT, "benchmarks", "memory.py"))
mem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mem)

# tiny nets with the inputs of a micro-batch of 2 (M = 2 objectives)
TINY = {
    "sd35": (
        model.SD3Transformer,
        model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2),
        lambda c: mem.sd3_inputs(c, 2, 8, 7),
    ),
    "flux": (
        model.FluxTransformer,
        model.FluxConfig(**model.FLUX_PRESETS["flux-tiny"], pref_dim=2),
        lambda c: mem.flux_inputs(c, 2, 8, 7),
    ),
    "ltx2": (
        model.LTX2Transformer,
        model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny"], pref_dim=2),
        lambda c: mem.ltx2_inputs(c, 2, 17, 64, 96, 7),
    ),
}


@pytest.fixture(autouse=True)
def torch_kernels():
    # on meta tensors only the references run (with TRITON_INTERPRET=1 the "triton" backend would take meta tensors)
    old = kernels.get_backend()
    kernels.set_backend("torch")
    yield
    kernels.set_backend(old)


def test_tracker_counts_known_bytes():
    lin = torch.nn.Linear(64, 32, dtype=torch.bfloat16, device="meta").requires_grad_(False)
    with mem.LiveBytes() as m, torch.no_grad():
        x = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")  # 512 bytes
        y = lin(x)  # 256; the transposed weight is a view of a storage made before the mode: not counted
        z = y.view(32, 4).t()  # views: nothing new
    assert (m.now, m.peak) == (768, 768)
    del x
    assert m.now == 256  # freed through the finalizer, after the mode too
    del y, z
    assert m.now == 0
    with mem.LiveBytes() as m:
        a = torch.empty(1000, device="meta")  # 4000
        b = a * 2  # 4000
        del a
        c = b.sin_()  # in place: nothing new
        d = torch.empty(500, device="meta")  # 2000
    assert (m.now, m.peak) == (6000, 8000) and c is b and d.numel() == 500


@pytest.mark.parametrize("name", sorted(TINY))
def test_tracker_equals_saved_tensors(name):
    # After a forward with a graph, what is alive is what autograd saved plus the inputs and the outputs: counted
    # independently through saved_tensors_hooks. FlashSDPA keeps the philox seed and offset (16 + 8 bytes) as ctx
    # attributes, outside the hooks.
    cls, cfg, inputs = TINY[name]
    net = mem.build(cls, cfg)
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with mem.flash_sdpa(), mem.LiveBytes() as m, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = {k: torch.randn(s, device="meta", dtype=torch.bfloat16) for k, s in dict(inputs(cfg), pref=(2, 2)).items()}
        out = net(**x)
    ends = [*x.values(), *(out if isinstance(out, tuple) else (out,))]
    alive = {**saved, **{t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in ends}}
    expected = sum(n for k, n in alive.items() if k in m.live)  # saved weights were made before the mode
    # SDPA calls: sd35-tiny 4 joint + 2 image-only (dual); flux-tiny 2 double + 2 single; ltx2-tiny 2 blocks x 6
    attentions = {"sd35": 4 + 2, "flux": 2 + 2, "ltx2": 2 * 6}[name]
    assert m.now - expected == 24 * attentions, (m.now, expected)


@pytest.mark.parametrize("name", sorted(TINY))
def test_meta_matches_real_cpu_tensors(name):
    # the same steps on real CPU tensors (SDPA picks its CPU flash kernel) and on meta tensors (FlashSDPA): the peaks
    # agree, so meta tensors with the flash substitution allocate what real kernels do
    cls, cfg, inputs = TINY[name]
    peaks = {}
    for dev in ("meta", "cpu"):
        net = mem.build(cls, cfg, dev)
        if dev == "cpu":
            for p in net.parameters():  # to_empty left them uninitialised
                torch.nn.init.normal_(p.data, std=0.02)
        with mem.flash_sdpa() if dev == "meta" else nullcontext():
            rollout = mem.step_peak(net, dict(inputs(cfg), pref=(2, 2)), False, dev)[0]
            net.grad_ckpt = True
            update = mem.step_peak(net, dict(inputs(cfg), pref=(2, 2)), True, dev)[0]
        peaks[dev] = rollout, update
    assert peaks["meta"][0] == peaks["cpu"][0]
    assert abs(peaks["meta"][1] - peaks["cpu"][1]) <= 1e-3 * peaks["cpu"][1], peaks


def test_plan_on_a_tiny_setting():
    cls, cfg, inputs = TINY["ltx2"]
    s = dict(
        name="tiny",
        net=(cls, cfg),
        inputs=inputs(cfg),
        aux=("SD3/FLUX VAE",),
        encoders=("T5-XXL encoder",),
        vae=(lambda: model.AutoencoderKL(channels=(8, 16), layers=1, latent=4, groups=4), (2, 4, 8, 8)),
    )
    r = mem.plan(s)
    assert r["params"] == sum(p.numel() for p in cls(model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny"])).parameters())
    assert 0 < r["rollout"] < r["update"] and r["decode"] > 0 and r["opt_step"] > 0
    assert r["stored"] == 0  # a setting without a step's size stores nothing
    assert r["peak"] == r["weights"] + r["adapter_state"] + r["aux"] + max(r["act"], r["opt_step"])
    r = mem.plan(dict(s, step=(6, 3), x0=("video", "audio")))  # 6 samples x 3 timesteps, old + base, bf16
    shapes = s["inputs"]
    assert r["stored"] == 2 * 2 * 6 * 3 * (math.prod(shapes["video"][1:]) + math.prod(shapes["audio"][1:]))
    assert r["peak"] == r["weights"] + r["adapter_state"] + r["aux"] + max(
        r["rollout"], r["update"] + r["stored"], r["decode"], r["opt_step"]
    )
    assert r["setup"] == r["weights"] + 2 * (83_819_683 + 4_762_310_656)
    r = mem.plan(dict(s, encode_first=True))  # ltx2_setup: the text encoder is freed before the transformer loads
    assert r["setup"] == max(r["aux"] + r["encoders"], r["weights"] + r["aux"]) == r["aux"] + r["encoders"]
    assert "DDP fits" in mem.verdict(r)


def test_full_size_counts():
    # model.py's parameter counts (tests/test_model.py, test_flux.py, test_ltx2.py); LTX-2's adapters in closed form
    M, r = 2, 32
    for cls, cfg, params in [
        (model.SD3Transformer, model.SD3Config(**model.SD3_PRESETS["sd35-medium"], pref_dim=M), 2_243_171_520),
        (model.FluxTransformer, model.FluxConfig(pref_dim=M), 11_901_408_320),
        (model.LTX2Transformer, model.LTX2Config(pref_dim=M), 18_876_174_592),
    ]:
        net = mem.build(cls, cfg)
        c = mem.counts(net)
        assert c["params"] == params
        lora = sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
        assert c["adapter_state"] == 6 * 4 * c["adapter_params"]  # LoRA and the preference modules: fp32 masters
    # per block: q, k, v, out of six attentions, r * (in + out) each: video self and text, all 4096 -> 4096; audio
    # self and text, all 2048 -> 2048; a2v and v2a, each two linears between 4096 and 2048 and two 2048 -> 2048
    D, Da = 4096, 2048
    per_block = r * (2 * 4 * 2 * D + 2 * 4 * 2 * Da + 2 * (2 * (D + Da) + 2 * 2 * Da))
    linear = lambda i, o: i * o + o
    pref = linear(M, D) + linear(D, D) + linear(2 * M, 768) + linear(768, D) + 3 * linear(D, D)
    assert lora == 48 * per_block and c["adapter_params"] == lora + pref


def test_aux_counts():
    # the literal counts of the frozen models, against their builds on the meta device
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        t5 = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
        vae = model.AutoencoderKL()
    assert sum(p.numel() for p in t5.parameters()) == mem.AUX["T5-XXL encoder"]
    assert sum(p.numel() for p in vae.parameters()) == mem.AUX["SD3/FLUX VAE"]
