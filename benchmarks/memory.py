"""Memory plan (issue 12): what one GPU holds to post-train each backbone with LoRA, computed without weights.

  python benchmarks/memory.py         meta device (no weights, no GPU; about 2 minutes on 2 CPU cores): the table
                                      and a verdict per setting (DDP or FSDP2 on 80 GB H100s)
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
"""

import argparse
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
BUDGET = 76.0  # GiB of an 80 GB H100 (79.6 GiB total) left after the CUDA context, cuBLAS / NCCL workspaces, slack

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


def settings(M=2):
    sd3, flux = model.SD3Config(**model.SD3_PRESETS["sd35-medium"], pref_dim=M), model.FluxConfig(pref_dim=M)
    ltx = model.LTX2Config(**model.LTX2_PRESETS["ltx2-19b"], pref_dim=M)
    vae16 = lambda B: (model.AutoencoderKL, (B, 16, 64, 64))  # (builder, latents of one decode micro-batch)
    vae_ltx = lambda B, F_, h, w: (lambda: model.LTX2VideoVAE(model.LTX2VAEConfig()), (B, 128, F_, h, w))
    rewards_t2i = ("Qwen2.5-VL-7B (VLM judge)", "PickScore (CLIP-H)")
    # LTX-2 (train.py's ltx2 preset: 512^2 x 49 frames, micro-batch 1, pickscore_photo + vlm_animation on every frame;
    # no audio VAE or vocoder in training), and a longer clip beside it
    ltx_aux = ("LTX-2 video VAE",) + rewards_t2i
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
            encoders=("T5-XXL encoder", "CLIP-L text", "OpenCLIP-bigG text"),
        ),
        dict(
            name="flux-kontext 512²+ref B4",
            net=(model.FluxTransformer, flux),
            inputs=flux_inputs(flux, 4, 64, 512),
            vae=vae16(4),
            aux=("SD3/FLUX VAE", "Qwen2.5-VL-7B (VLM judge)", "DINOv2-base"),
            step=step("flux-kontext"),
            x0=("x",),
            encoders=("T5-XXL encoder", "CLIP-L text"),
        ),
        dict(
            name="ltx2-19b 512²x49f B1",
            net=(model.LTX2Transformer, ltx),
            inputs=ltx2_inputs(ltx, 1, 49, 512, 512, 1024),
            vae=vae_ltx(1, 7, 16, 16),
            aux=ltx_aux,
            step=step("ltx2"),
            x0=("video", "audio"),
            encoders=("Gemma-3-12B text", "LTX-2 text connectors"),
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
            encoders=("Gemma-3-12B text", "LTX-2 text connectors"),
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
    return dict(
        params=sum(p.numel() for p in base),
        weights=nbytes(base) + nbytes(net.buffers()),
        adapter_params=sum(p.numel() for p in adapters),
        # param + grad + AdamW exp_avg, exp_avg_sq (param dtype) + old policy + EMA (train.py's state copies)
        adapter_state=6 * nbytes(adapters),
        block=max(nbytes(b.parameters()) for b in blocks),
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
    r["encoders"] = 2 * sum(AUX[a] for a in s["encoders"])
    # the update's stored velocities: old policy and base model, bf16, every (timestep, sample) of a step on one GPU
    samples, timesteps = s.get("step", (B, 1))
    r["stored"] = 2 * 2 * samples * timesteps * sum(math.prod(s["inputs"][k][1:]) for k in s.get("x0", ()))
    # steady state: resident + the largest transient (the phases run one after another); setup: train.py loads the
    # rewards, then the pipeline with its text encoders on the GPU, encodes every prompt, then moves them to the CPU;
    # encode_first (ltx2_setup): the text encoders load, encode and are freed before the transformer and VAE load
    r["act"] = max(r["rollout"], r["update"], r["decode"])
    r["peak"] = (
        r["weights"]
        + r["adapter_state"]
        + r["aux"]
        + max(r["rollout"], r["update"] + r["stored"], r["decode"], r["opt_step"])
    )
    r["setup"] = (
        max(r["aux"] + r["encoders"], r["weights"] + r["aux"])
        if s.get("encode_first")
        else r["weights"] + r["aux"] + r["encoders"]
    )
    return r


def verdict(r, budget=BUDGET * GiB):
    # DDP (train.py: a full replica per rank, gradients all-reduced in place) needs the whole peak on every GPU; FSDP2
    # shards weights and adapter state over N GPUs and all-gathers one block at a time (about 2 blocks with prefetch)
    # (the reward models and the VAE stay whole). Activations grow about linearly with the micro-batch.
    per_sample = r["act"] / r["batch"]
    gathered = lambda n: 2 * r["block"] if n > 1 else 0
    largest = lambda n: int(
        (budget - (r["weights"] + r["adapter_state"]) / n - gathered(n) - r["aux"] - r["stored"] / n) // per_sample
    )
    if largest(1) >= r["batch"]:
        line = (
            f"DDP fits ({r['peak'] / GiB:.1f} of {BUDGET:.0f} GiB) on any number of GPUs, up to micro-batch "
            f"~{largest(1)}; FSDP2 only past that (over 8 GPUs: up to ~{largest(8)})"
        )
    else:
        n = next((n for n in (2, 4, 8, 16, 32, 64) if largest(n) >= r["batch"]), None)
        line = f"DDP does not fit ({r['peak'] / GiB:.1f} GiB); " + (
            f"FSDP2 over >= {n} GPUs" if n else "not even fully sharded: smaller micro-batch or rewards off the GPU"
        )
    if r["setup"] > budget:
        line += f"; the setup does not ({r['setup'] / GiB:.1f} GiB): encode the prompts before loading the rest"
    return line


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
    args = p.parse_args()
    if args.cuda and not torch.cuda.is_available():
        sys.exit("--cuda: no CUDA device")
    kernels.set_backend("torch")  # meta tensors cannot run Triton kernels (see the docstring)
    rows = []
    for s in (s for s in settings() if args.case in s["name"]):
        rows.append(plan(s))
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
    print(
        "GiB unless a count. adapter state: 6x the adapters (param, grad, AdamW m and v, old policy, EMA);\n"
        "rollout / update / decode act.: activation peak of one micro-batch (update: forward + backward, gradient\n"
        "checkpointing); stored v: the update's old-policy and base velocities of one step (bf16); peak = weights\n"
        "+ adapter state + VAE + rewards + the largest transient (rollout, update + stored v, decode, or the\n"
        "optimizer step's temporaries); setup = weights + VAE + rewards + text encoders (on the GPU until the\n"
        "prompts are encoded; LTX-2 encodes first and frees Gemma: the larger of VAE + rewards + text encoders and\n"
        "weights + VAE + rewards).\n"
    )
    table(rows)
    print()
    for r in rows:
        print(f"{r['name']}: {verdict(r)}")


if __name__ == "__main__":
    main()
