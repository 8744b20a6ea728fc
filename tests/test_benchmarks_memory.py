# benchmarks/memory.py: the live-bytes tracker against independent counts, the meta device against real CPU tensors,
# and the full-size counts against model.py's.
import importlib.util
import math
import os
from contextlib import nullcontext
from dataclasses import replace

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


def tiny_plan(**kw):
    cls, cfg, inputs = TINY["ltx2"]
    s = dict(
        name="tiny",
        net=(cls, cfg),
        inputs=inputs(cfg),
        aux=("SD3/FLUX VAE", "DINOv2-base"),
        encoders=(("T5-XXL encoder",),),
        vae=(lambda: model.AutoencoderKL(channels=(8, 16), layers=1, latent=4, groups=4), (2, 4, 8, 8)),
    )
    return mem.plan(dict(s, **kw))


def test_plan_on_a_tiny_setting():
    r = tiny_plan()
    cls, cfg, inputs = TINY["ltx2"]
    assert r["params"] == sum(p.numel() for p in cls(model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny"])).parameters())
    assert 0 < r["rollout"] < r["update"] and r["decode"] > 0 and r["opt_step"] > 0
    assert r["stored"] == 0  # a setting without a step's size stores nothing
    # peak: every phase's, setup included (here the T5 encoder's, 9 GiB beside a tiny net)
    assert r["peak"] == max(r["setup"], r["weights"] + r["adapter_state"] + r["aux"] + max(r["act"], r["opt_step"]))
    r = tiny_plan(step=(6, 3), x0=("video", "audio"))  # 6 samples x 3 timesteps, old + base, bf16
    shapes = inputs(cfg)
    assert r["stored"] == 2 * 2 * 6 * 3 * (math.prod(shapes["video"][1:]) + math.prod(shapes["audio"][1:]))
    assert r["peak"] == max(
        r["setup"],
        r["weights"]
        + r["adapter_state"]
        + r["aux"]
        + max(r["rollout"], r["update"] + r["stored"], r["decode"], r["opt_step"]),
    )
    # setup: the rewards, then the text encoders beside the VAE and the transformer
    assert r["setup"] == r["weights"] + 2 * (83_819_683 + 86_580_480 + 4_762_310_656)
    # encode_first (LTX-2): the text encoders (a group at a time) encode before the transformer and the VAE load
    r = tiny_plan(encode_first=True, encoders=(("T5-XXL encoder",), ("CLIP-L text", "DINOv2-base")), encode_act=7)
    assert r["setup"] == 2 * 86_580_480 + 2 * 4_762_310_656 + 7


def test_per_gpu_options():
    # the phases put together: --fsdp shards the transformer and its adapter state, --offload keeps each part on the
    # GPU in its phase only, --quantize int8 shrinks the base's Linears; each rank stores its share of the velocities
    r = tiny_plan(step=(8, 3), x0=("video",))
    plain, rewards, vae = mem.per_gpu(r), 2 * 86_580_480, 2 * 83_819_683
    assert max(plain.values()) == r["peak"] and list(plain) == [
        "setup",
        "rollout",
        "decode",
        "score",
        "update",
        "optimizer",
    ]
    net = r["weights"] + r["adapter_state"]
    assert plain["update"] == net + vae + rewards + r["update"] + r["stored"]
    assert mem.per_gpu(r, 4)["update"] == plain["update"] - r["stored"] * 3 / 4  # DDP: a replica on every rank
    fsdp = mem.per_gpu(r, 4, "--fsdp")
    assert fsdp["update"] == net / 4 + 2 * r["block"] + vae + rewards + r["update"] + r["stored"] / 4
    assert fsdp["setup"] == rewards + 2 * 4_762_310_656 + vae  # the base is read after the encoding, sharded
    off = mem.per_gpu(r, 1, "--offload")
    assert off["update"] == net + r["update"] + r["stored"] and off["score"] == r["adapter_state"] + rewards
    assert off["decode"] == r["adapter_state"] + vae + r["decode"] and off["setup"] == max(
        rewards, plain["setup"] - rewards
    )
    both = mem.per_gpu(r, 2, "--fsdp --offload")
    assert both["score"] == net / 2 + rewards and max(both.values()) < max(fsdp.values())
    int8 = mem.per_gpu(r, 1, "--quantize int8")
    assert int8["update"] == plain["update"] - r["weights"] + r["weights_int8"] + 2 * r["linear_max"]
    assert (
        mem.offload_traffic(r, "") == 0
        and mem.offload_traffic(r, "--fsdp --offload") == 2 * r["adapter_state"] / 6 + r["aux"]
    )
    rows = mem.rows_of([r])
    assert len(rows) == len(mem.OPTIONS) * len(mem.GPUS) == len({(x["setting"], x["gpus"]) for x in rows})
    row = next(x for x in rows if x["setting"] == "tiny --quantize int8 --offload" and x["gpus"] == 1)
    assert row["peak_gib"] == round(max(mem.per_gpu(r, 1, "--quantize int8 --offload").values()) / mem.GiB, 2)
    met = mem.goals([dict(x, setting=x["setting"].replace("tiny", "ltx2-19b 768x512x121f B1")) for x in rows])
    assert [g[:3] for g in met] == [g for g in mem.GOALS if g[0].startswith("ltx2")] and all(g[4] for g in met)


@pytest.mark.parametrize("name", sorted(TINY))
def test_int8_weights_as_torchao_stores_them(name):
    # the plan's int8 base (1 byte a Linear weight + INT8_ROW a row) against the bytes torchao's tensors hold after
    # model.quantize_int8 on the tiny net (what --quantize int8 does to the frozen base)
    pytest.importorskip("torchao")
    cls, cfg, _ = TINY[name]
    r = mem.counts(mem.build(cls, cfg))
    net = model.quantize_int8(cls(replace(cfg, pref_dim=0)).to(torch.bfloat16))

    def nbytes(t):
        inner = t.__tensor_flatten__()[0] if hasattr(t, "__tensor_flatten__") else None
        return sum(nbytes(getattr(t, k)) for k in inner) if inner else t.numel() * t.element_size()

    stored = sum(nbytes(t) for t in (*net.parameters(), *net.buffers()))
    assert stored == r["weights"] - r["linear"] + r["linear_rows"] * mem.INT8_ROW


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
