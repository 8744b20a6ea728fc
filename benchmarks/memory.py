"""Memory plan (issue 12): what one GPU holds to post-train each backbone with LoRA, computed without weights.

  python benchmarks/memory.py         meta device (no weights, no GPU; about 2 minutes on 2 CPU cores): the parts,
                                      then the peak per GPU for 1, 2, 4, 8 GPUs with train.py's --fsdp, --offload,
                                      --quantize int8, and the goals (README "What you need")
  python benchmarks/memory.py --json  the per-GPU rows as one JSON list ({"setting", "gpus", "peak_gib", ...})
  python benchmarks/memory.py --cuda  also run every step on the GPU (uninitialised bf16 weights) and print the
                                      tracker's peak next to torch.cuda.max_memory_allocated

Method. Each network is built on the meta device as train.py holds it (model.py's precision policy): the base in bf16,
LoRA r32 / alpha 64 on the attention projections and the two preference modules as fp32 masters.
A step's activation peak comes from running the real forward (and backward) on meta tensors under LiveBytes, a
dispatch mode that adds each new storage's bytes when an op returns it and subtracts them when the storage is freed
(a weakref finalizer): the peak of that sum is the step's peak above what was resident before. Gradient
checkpointing runs as in training (torch.utils.checkpoint works on meta tensors). Two substitutions make meta tensors
behave like an H100: SDPA goes through FlashAttention's aten op (on meta, SDPA takes the math path and would hold the
L x L matrix), and kernels/ runs its torch references (the Triton kernels need a GPU; the references keep fp32
intermediates, so the recomputed block's share is an upper bound). Not counted: the caching allocator's rounding and
fragmentation, cuBLAS / NCCL workspaces, the reward models' activations.

Per GPU (per_gpu): the measured parts put together phase by phase as train.py runs them (setup, rollout, decode,
score, update, optimizer step), with or without --offload (a part on the GPU only in its phase), --fsdp over N GPUs
(the transformer and its adapter state 1/N each, plus the block in use and the next, all-gathered) and --quantize int8
(the base's Linear weights 1 byte a parameter plus a scale and zero point per row, torchao's Int8Tensor).
"""

import argparse
import json
import math
import os
import sys
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

GiB = 2**30
GPUS = (1, 2, 4, 8)
# train.py's memory options (--fsdp with --quantize is refused)
OPTIONS = ("", "--offload", "--fsdp", "--fsdp --offload", "--quantize int8", "--quantize int8 --offload")
INT8_ROW = 5  # bytes per output row beside an int8 weight: torchao 0.18's Int8Tensor, an fp32 scale + int8 zero point
PCIE = 25e9  # bytes/s between host and GPU assumed for --offload (pinned, PCIe 4.0 x16; an H100 SXM's 5.0 link: ~2x)
# README's goals: (setting as the rows name it, GPUs, GiB per GPU)
GOALS = [
    ("sd35-medium 512² B8 --offload", 1, 24),
    ("flux-kontext 512²+ref B4 --offload", 1, 40),
    ("ltx2-19b 768x512x121f B1", 1, 72),
    ("flux-kontext 512²+ref B4 --fsdp --offload", 4, 24),
    ("ltx2-19b 768x512x121f B1 --fsdp --offload", 8, 24),
    ("flux-kontext 512²+ref B4 --quantize int8 --offload", 1, 24),
]

# Frozen models beside the transformer, bf16: parameter counts of the released checkpoints (counted on the meta
# device: transformers' classes from each config.json, model.py's VAEs and connectors as tests/ and README.md do).
AUX = {
    "T5-XXL encoder": 4_762_310_656,
    "CLIP-L text": 123_650_304,
    "OpenCLIP-bigG text": 694_659_840,
    "Gemma-3-12B text": 11_766_034_176,
    "LTX-2 text connectors": 1_431_475_200,
    "SD3/FLUX VAE": 83_819_683,
    "LTX-2 video VAE": 1_222_479_601,
    "Qwen2.5-VL-7B (VLM judge)": 8_292_166_656,
    "PickScore (CLIP-H)": 986_109_441,
    "DINOv2-base": 86_580_480,
}

# ----------------------------------------------------------------------------------------------------
# The tracker


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive that were created under this mode, and their peak. A storage is counted once
    however many views share it; it stops counting when freed, inside or after the mode."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view, an in-place op) allocates nothing, e.g. the transpose of a weight
        seen = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            st = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if st is not None and st._cdata not in self.live and st._cdata not in seen:
                # one Python object per storage for its whole life, so the finalizer runs when the memory is freed
                self.live.add(st._cdata)
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self.free, st._cdata, st.nbytes())
        return out

    def free(self, key, n):
        self.live.discard(key)
        self.now -= n


class FlashSDPA(torch.autograd.Function):
    # What SDPA keeps on an H100 (FlashAttention-2): q, k, v, the output and an fp32 log-sum-exp per query.
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rest = rest[:6]  # cum_seq_q/k, max_q/k, philox seed/offset
        return out

    @staticmethod
    def backward(ctx, dout):
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, *ctx.saved_tensors, *ctx.rest[:4], 0.0, False, *ctx.rest[4:]
        )[:3]


@contextmanager
def flash_sdpa():
    # model.attention calls F.scaled_dot_product_attention: swap it for the flash op while measuring on meta
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, attn_mask=None: (
        FlashSDPA.apply(q, k, v) if attn_mask is None else sdpa(q, k, v, attn_mask=attn_mask)
    )
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


# ----------------------------------------------------------------------------------------------------
# The settings: train.py's BACKBONES presets; LTX-2 has none yet, so its default is stated here


def sd3_inputs(cfg, B, h, L):  # latent h x h; L = 77 CLIP + 256 T5 tokens
    return dict(x=(B, cfg.in_channels, h, h), sigma=(B,), context=(B, L, cfg.context_dim), pooled=(B, cfg.pooled_dim))


def flux_inputs(cfg, B, h, L):  # target and Kontext reference, both h x h latents; L = 512 T5 tokens
    C = cfg.in_channels // 4
    return dict(
        x=(B, C, h, h),
        sigma=(B,),
        context=(B, L, cfg.context_dim),
        pooled=(B, cfg.pooled_dim),
        guidance=(B,),
        ref=(B, C, h, h),
    )


def ltx2_inputs(cfg, B, frames, height, width, L, fps=24.0):
    # pixels -> latent: 8k+1 frames -> k+1, 32x32 -> 1; audio: 100 mel frames/s / 4 = 25 latent frames/s for the
    # clip's duration (pipeline_ltx2.py); L = 1024 Gemma tokens (LTX-2 pads every prompt to 1024)
    F_, fs = (frames - 1) // cfg.vae_scale_factors[0] + 1, cfg.vae_scale_factors[1]
    A = round(frames / fps * cfg.audio_sampling_rate / cfg.audio_hop_length / cfg.audio_scale_factor)
    mel = cfg.audio_in_channels // cfg.audio_channels
    return dict(
        video=(B, cfg.in_channels, F_, height // fs, width // fs),
        audio=(B, cfg.audio_channels, A, mel),
        sigma=(B,),
        context=(B, L, cfg.caption_channels),
        context_audio=(B, L, cfg.caption_channels),
    )


def t5_act(prompts, tokens, heads=64):
    # T5's eager attention, one layer's scores and probabilities (bf16) for a chunk of prompts: its largest transient
    return 2 * 2 * prompts * heads * tokens**2


def settings(M=2):
    sd3, flux = model.SD3Config(**model.SD3_PRESETS["sd35-medium"], pref_dim=M), model.FluxConfig(pref_dim=M)
    ltx = model.LTX2Config(**model.LTX2_PRESETS["ltx2-19b"], pref_dim=M)
    vae16 = lambda B: (model.AutoencoderKL, (B, 16, 64, 64))  # (builder, latents of one decode micro-batch)
    vae_ltx = lambda B, F_, h, w: (lambda: model.LTX2VideoVAE(model.LTX2VAEConfig()), (B, 128, F_, h, w))
    rewards_t2i = ("Qwen2.5-VL-7B (VLM judge)", "PickScore (CLIP-H)")
    # LTX-2 (train.py's ltx2 preset: 512^2 x 49 frames, micro-batch 1, pickscore_photo + vlm_animation on every frame;
    # no audio VAE or vocoder in training), and a longer clip beside it
    ltx_aux = ("LTX-2 video VAE",) + rewards_t2i
    # Gemma-3, then the connectors, visit the GPU in turn (sample.LTX2TextEncoder), one prompt at a time: Gemma's 49
    # hidden states of 1024 x 3840 (bf16) and their stacked copy
    gemma, gemma_act = (("Gemma-3-12B text",), ("LTX-2 text connectors",)), 2 * 49 * 1024 * 3840 * 2
    # one optimizer step's samples and trained timesteps (train.py's presets): the update keeps the old policy's and
    # the base model's velocity of every (timestep, sample) on the GPU through its gradient pass
    preset = lambda b: train.Config(**train.BACKBONES[b]["preset"])
    step = lambda b: (
        preset(b).prompts_per_step * preset(b).prefs_per_prompt * preset(b).group_size,
        int(preset(b).timestep_fraction * preset(b).sample_steps),
    )
    return [
        dict(
            name="sd35-medium 512² B8",
            net=(model.SD3Transformer, sd3),
            inputs=sd3_inputs(sd3, 8, 64, 333),
            vae=vae16(8),
            aux=("SD3/FLUX VAE",) + rewards_t2i,
            step=step("sd35"),
            x0=("x",),
            encoders=(("T5-XXL encoder", "CLIP-L text", "OpenCLIP-bigG text"),),  # together (Pipeline.encoding)
            encode_act=t5_act(8, 256),  # train.encode_all: 8 prompts at a time
        ),
        dict(
            name="flux-kontext 512²+ref B4",
            net=(model.FluxTransformer, flux),
            inputs=flux_inputs(flux, 4, 64, 512),
            vae=vae16(4),
            aux=("SD3/FLUX VAE", "Qwen2.5-VL-7B (VLM judge)", "DINOv2-base"),
            step=step("flux-kontext"),
            x0=("x",),
            encoders=(("T5-XXL encoder", "CLIP-L text"),),
            encode_act=t5_act(8, 512),
        ),
        dict(
            name="ltx2-19b 512²x49f B1",
            net=(model.LTX2Transformer, ltx),
            inputs=ltx2_inputs(ltx, 1, 49, 512, 512, 1024),
            vae=vae_ltx(1, 7, 16, 16),
            aux=ltx_aux,
            step=step("ltx2"),
            x0=("video", "audio"),
            encoders=gemma,
            encode_act=gemma_act,
            encode_first=True,
        ),
        dict(
            name="ltx2-19b 768x512x121f B1",
            net=(model.LTX2Transformer, ltx),
            inputs=ltx2_inputs(ltx, 1, 121, 512, 768, 1024),
            vae=vae_ltx(1, 16, 16, 24),
            aux=ltx_aux,
            step=step("ltx2"),
            x0=("video", "audio"),
            encoders=gemma,
            encode_act=gemma_act,
            encode_first=True,
        ),
    ]


# ----------------------------------------------------------------------------------------------------
# Measuring one setting


def build(cls, cfg, device="meta", rank=32):
    # bf16 base, then the preference modules (cfg.pref_dim) and LoRA in fp32, as train.py makes them
    with torch.device("meta"):
        net = cls(replace(cfg, pref_dim=0)).to(torch.bfloat16)
    model.add_preference(net, cfg.pref_dim)  # drawn on the CPU when the weights are on meta; moved below
    model.add_lora(net, rank, 2 * rank)
    net = net.to("meta") if device == "meta" else net.to_empty(device=device)
    for p in model.adapter_state(net).values():  # accumulated over micro-batches: resident, not part of the step
        p.grad = torch.zeros_like(p)
    return net


def step_peak(fn, inputs, train, device):
    """-> (tracked peak, CUDA allocator peak or None) in bytes above the resident state: one micro-batch forward
    without a graph (a rollout step, or the old / base policy in the update), or forward + backward (the update)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with LiveBytes() as mem, torch.set_grad_enabled(train):
        x = {k: torch.randn(s, device=device, dtype=torch.bfloat16) for k, s in inputs.items()}
        out = fn(**x)
        if train:
            sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
        del x, out
    cuda = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return mem.peak, cuda


def counts(net):
    # the resident part: base parameter count, weight bytes (with buffers), adapter count and training state bytes
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    adapters = model.adapter_state(net).values()
    base = [p for n, p in net.named_parameters() if not model.is_adapter_param(n)]
    blocks = [b for ml in net.children() if isinstance(ml, torch.nn.ModuleList) for b in ml]
    linears = [m.weight for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("pref_")]
    return dict(
        params=sum(p.numel() for p in base),
        weights=nbytes(base) + nbytes(net.buffers()),
        adapter_params=sum(p.numel() for p in adapters),
        # param + grad + AdamW exp_avg, exp_avg_sq (param dtype) + old policy + EMA (train.py's state copies)
        adapter_state=6 * nbytes(adapters),
        block=max(nbytes(b.parameters()) for b in blocks),
        # the Linear weights --quantize int8 turns to int8 (model.quantize_int8: all but the preference modules')
        linear=sum(w.numel() for w in linears),
        linear_rows=sum(w.shape[0] for w in linears),
        linear_max=max(w.numel() for w in linears),
    )


def plan(s, device="meta", M=2):
    """One setting -> a dict of counts and bytes (see the table). M: objectives (the preference input)."""
    net = build(*s["net"], device)
    B = s["inputs"]["sigma"][0]
    r = dict(name=s["name"], batch=B, **counts(net))
    with flash_sdpa() if device == "meta" else nullcontext():
        r["rollout"], r["rollout_cuda"] = step_peak(net, dict(s["inputs"], pref=(B, M)), False, device)
        net.grad_ckpt = True
        r["update"], r["update_cuda"] = step_peak(net, dict(s["inputs"], pref=(B, M)), True, device)
        opt = torch.optim.AdamW(model.adapter_state(net).values(), weight_decay=1e-4, foreach=True)  # CUDA's default
        opt.step()  # creates exp_avg, exp_avg_sq (resident: in the adapter state); the next step's temporaries are not
        with LiveBytes() as mem:
            opt.step()
        r["opt_step"] = mem.peak
        del net, opt
        with torch.device("meta"):
            vae = s["vae"][0]().to(torch.bfloat16)
        vae = vae if device == "meta" else vae.to_empty(device=device)
        r["decode"], r["decode_cuda"] = step_peak(lambda z: vae.decode(z), dict(z=s["vae"][1]), False, device)
    r["aux"] = 2 * sum(AUX[a] for a in s["aux"])
    r["vae_weights"] = 2 * sum(AUX[a] for a in s["aux"] if "VAE" in a)
    r["weights_int8"] = r["weights"] - r["linear"] * 2 + r["linear"] + r["linear_rows"] * INT8_ROW
    # the text encoders visit the GPU a group at a time: the largest group, and its activations while it encodes
    r["encoders"] = max((2 * sum(AUX[a] for a in g) for g in s["encoders"]), default=0)
    r["encode_act"], r["encode_first"] = s.get("encode_act", 0), s.get("encode_first", False)
    # the update's stored velocities: old policy and base model, bf16, every (timestep, sample) of a step on one GPU
    samples, timesteps = s.get("step", (B, 1))
    r["stored"] = 2 * 2 * samples * timesteps * sum(math.prod(s["inputs"][k][1:]) for k in s.get("x0", ()))
    r["act"] = max(r["rollout"], r["update"], r["decode"])
    phases = per_gpu(r)  # one GPU, no options
    r["peak"], r["setup"] = max(phases.values()), phases["setup"]
    return r


def per_gpu(r, gpus=1, options=""):
    """A plan (plan()) on `gpus` GPUs with train.py's options -> {phase: peak bytes on one GPU}, the phases in the
    order train.py runs them. Each rank samples, decodes and scores its share of a step's samples (stored v: 1/N);
    --fsdp shards the transformer and its adapter state (1/N each) and all-gathers the block in use and the next
    (FSDP2's prefetch); --quantize int8 stores the base's Linears in int8 and dequantizes one to bf16 in its matmul;
    without --offload everything stays on the GPU once loaded; with it, the transformer (its shards stay under --fsdp;
    the adapters' optimizer state, old policy and EMA always stay), the VAE and the reward models visit in their phase.
    Setup: the rewards load first (--offload: then leave); the text encoders encode (rank 0 under --fsdp) beside the
    VAE and, unless the base is read later (--fsdp, --quantize: lazily) or LTX-2 encodes first, the transformer."""
    fsdp, offload, int8 = "--fsdp" in options, "--offload" in options, "int8" in options
    n = gpus if fsdp else 1
    weights = r["weights_int8"] if int8 else r["weights"]
    shards = (weights + r["adapter_state"]) / n
    running = shards + (2 * r["block"] if n > 1 else 0) + (2 * r["linear_max"] if int8 else 0)
    rewards, vae = r["aux"] - r["vae_weights"], r["vae_weights"]
    encode = r["encoders"] + r["encode_act"]
    if not r["encode_first"]:
        encode += vae + (0 if fsdp or int8 else weights)
    stored = r["stored"] / gpus
    held = 0 if offload else vae + rewards  # beside the transformer while it runs
    other = (shards if fsdp else r["adapter_state"]) if offload else shards  # beside the VAE and the rewards
    return dict(
        setup=max(rewards, encode + (0 if offload else rewards)),
        rollout=running + held + r["rollout"],
        decode=other + (0 if offload else rewards) + vae + r["decode"],
        score=other + (0 if offload else vae) + rewards,
        update=running + held + r["update"] + stored,
        optimizer=shards + held + r["opt_step"],
    )


def offload_traffic(r, options):
    """--offload's bytes over PCIe per optimizer step (the phases run net, VAE, rewards, net: each part in and out
    once). In: the transformer (not under --fsdp: its shards stay), the VAE, the reward models. Out: only what
    changed, the adapters (frozen tensors keep their host copy); an int8 base (a tensor subclass) moves both ways."""
    if "--offload" not in options:
        return 0
    base = 0 if "--fsdp" in options else (2 * r["weights_int8"] if "int8" in options else r["weights"])
    return base + 2 * r["adapter_state"] / 6 + r["aux"]


def rows_of(plans):
    # one row per (setting, options, GPU count), as --json prints them
    out = []
    for r in plans:
        for o in OPTIONS:
            for g in GPUS:
                p = per_gpu(r, g, o)
                out.append(
                    dict(
                        setting=f"{r['name']} {o}".strip(),
                        gpus=g,
                        peak_gib=round(max(p.values()) / GiB, 2),
                        phases_gib={k: round(v / GiB, 2) for k, v in p.items()},
                        offload_gb_per_step=round(offload_traffic(r, o) / 1e9, 1),
                        offload_s_per_step=round(offload_traffic(r, o) / PCIE, 2),
                    )
                )
    return out


def need_table(rows):
    # README "What you need": the peak GiB per GPU, a column per GPU count
    print("| setting | " + " | ".join(f"{g} GPU{'s' * (g > 1)}" for g in GPUS) + " | offload per step |")
    print("|---|" + "---|" * (len(GPUS) + 1))
    for name in dict.fromkeys(x["setting"] for x in rows):
        mine = [x for x in rows if x["setting"] == name]
        moved = f"{mine[0]['offload_gb_per_step']} GB, {mine[0]['offload_s_per_step']} s" if "offload" in name else ""
        print(f"| {name} | " + " | ".join(f"{x['peak_gib']:.1f}" for x in mine) + f" | {moved} |")


def goals(rows):
    # -> the README's goals, each with its row's peak and whether it is met
    peak = {(x["setting"], x["gpus"]): x["peak_gib"] for x in rows}
    return [(s, g, goal, peak[(s, g)], peak[(s, g)] <= goal) for s, g, goal in GOALS if (s, g) in peak]


def table(rows):
    # a Markdown table (README.md carries it as printed); bytes in GiB
    gib = lambda key, digits=1: lambda r: f"{r[key] / GiB:.{digits}f}"
    cols = [
        ("setting", lambda r: r["name"]),
        ("params", lambda r: f"{r['params']:,}"),
        ("weights", gib("weights")),
        ("LoRA + pref params", lambda r: f"{r['adapter_params']:,}"),
        ("adapter state", gib("adapter_state", 2)),
        ("VAE + rewards", gib("aux")),
        ("rollout act.", gib("rollout", 2)),
        ("update act.", gib("update", 2)),
        ("decode act.", gib("decode", 2)),
        ("stored v", gib("stored", 2)),
        ("peak", gib("peak")),
        ("text enc.", gib("encoders")),
        ("setup", gib("setup")),
    ]
    print("| " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f(r) for _, f in cols) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true", help="also measure every step on the GPU")
    p.add_argument("--case", default="", help="only settings whose name contains this")
    p.add_argument("--json", action="store_true", help="print the per-GPU rows as one JSON list, nothing else")
    args = p.parse_args()
    if args.cuda and not torch.cuda.is_available():
        sys.exit("--cuda: no CUDA device")
    kernels.set_backend("torch")  # meta tensors cannot run Triton kernels (see the docstring)
    plans = []
    for s in (s for s in settings() if args.case in s["name"]):
        plans.append(plan(s))
        if args.cuda:
            kernels.set_backend("triton")
            c = plan(s, "cuda")
            kernels.set_backend("torch")
            print(
                f"{s['name']} on {torch.cuda.get_device_name()}: "
                + ", ".join(
                    f"{k} tracked {c[k] / GiB:.2f} / allocator {c[k + '_cuda'] / GiB:.2f} GiB"
                    for k in ("rollout", "update", "decode")
                )
            )
    rows = rows_of(plans)
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    print(
        "GiB unless a count. adapter state: 6x the adapters (param, grad, AdamW m and v, old policy, EMA);\n"
        "rollout / update / decode act.: activation peak of one micro-batch (update: forward + backward, gradient\n"
        "checkpointing); stored v: the update's old-policy and base velocities of one step (bf16); peak: the largest\n"
        "phase on one GPU without --offload (weights + adapter state + VAE + rewards + the largest transient);\n"
        "text enc.: the largest group of text encoders on the GPU at once; setup: its phase (per_gpu).\n"
    )
    table(plans)
    print("\nPeak GiB per GPU over every phase, setup included (per_gpu), by GPU count; --offload's traffic per step")
    print(f"at an assumed {PCIE / 1e9:.0f} GB/s:\n")
    need_table(rows)
    print()
    for s, g, goal, peak, ok in goals(rows):
        print(f"{'met   ' if ok else 'MISSED'} {s} on {g} GPU{'s' * (g > 1)}: {peak:.1f} GiB (goal <= {goal})")


if __name__ == "__main__":
    main()
