"""Whole model blocks with the kernels on and off, at the real shapes: the end-to-end check of kernels/.

  python benchmarks/blocks.py              CUDA, bf16: each block (SD3.5 joint; FLUX double / single, at 1024^2 with
                                           and without a Kontext reference; LTX-2 audio-video, 512^2 x 49 frames and
                                           768x512 x 121 frames) forward and forward+backward, eager (kernels off) vs
                                           kernels on vs torch.compile (off / on)
  python benchmarks/blocks.py --cpu-smoke  CPU (TRITON_INTERPRET=1), a tiny block: the script itself works

As training runs them: the frozen base in bf16 with LoRA r32 on the backbone's attention projections (fp32 masters,
computed in bf16; --no-lora: none), gradients w.r.t. the activations and the adapters. The per-op rows are
kernels/bench.py, whose timing and table this uses (same columns; GB/s is not defined for a whole block). Target
(issue 4): the joint block forward+backward >= 1.3x eager and never slower than torch.compile.
"""

import os
import sys

if __name__ == "__main__" and "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and kernels/ are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
import model  # noqa: E402
from kernels.bench import bench_us, print_rows, start, step  # noqa: E402
from model import (  # noqa: E402  # noqa: E402  # noqa: E402
    FLUX_PRESETS,
    LTX2_PRESETS,
    SD3_PRESETS,
    DoubleStreamBlock,
    FluxConfig,
    FluxTransformer,
    JointBlock,
    LTX2Block,
    LTX2Config,
    LTX2Transformer,
    SD3Config,
    SD3Transformer,
    SingleStreamBlock,
)


def sd3_block(preset, i, n_img, n_txt):
    # an SD3.5 joint block (dual attention in blocks 0-12 of medium): leaves ctx, x, c, m (slider)
    cfg = SD3Config(**SD3_PRESETS[preset])
    blk, D = JointBlock(cfg, i), cfg.hidden
    blk.lora_targets = SD3Transformer.lora_targets
    return (
        blk,
        [(1, n_txt, D), (1, n_img, D), (1, D), (1, D)],
        lambda ctx, x, c, m: tuple(t for t in blk(ctx, x, c, m) if t is not None),
    )


def flux_block(preset, kind, n_img, n_txt):
    # a FLUX double or single block with its RoPE tables; n_img = target (+ Kontext reference) tokens. Leaves: the
    # stream(s), vec, m; the slider reaches the image tokens only (single blocks: m_range over the image part)
    cfg = FluxConfig(**FLUX_PRESETS[preset])
    D, L = cfg.hidden, n_txt + n_img
    ids = torch.cat([torch.zeros(n_txt, 3), model.flux_ids(0, 1, n_img)]).long()  # token count, not geometry, matters
    cos, sin = model.flux_rope(ids, cfg.axes_dim, cfg.theta)
    if kind == "double":
        blk = DoubleStreamBlock(cfg)
        blk.lora_targets = FluxTransformer.lora_targets
        return (
            blk,
            [(1, n_txt, D), (1, n_img, D), (1, D), (1, D)],
            lambda txt, img, vec, m: blk(txt, img, vec, cos.to(img.device), sin.to(img.device), m),
        )
    blk = SingleStreamBlock(cfg)
    blk.lora_targets = FluxTransformer.lora_targets
    return (
        blk,
        [(1, L, D), (1, D), (1, D)],
        lambda x, vec, m: (blk(x, vec, cos.to(x.device), sin.to(x.device), m, (n_txt, L)),),
    )


def ltx2_block(preset, frames, h, w, n_audio, n_txt):
    # an LTX-2 block (both streams, text cross-attention, a2v / v2a) with the forward's four RoPE tables at 24 fps
    # (LTX2Transformer.rope reads only self.cfg); frames x h x w latent video tokens, n_audio audio tokens, n_txt text
    # tokens without a padding mask. Leaves: video, audio, the two projected texts, the six global modulations
    # [B, n*D] as the forward makes them (video 6, audio 6, a2v/v2a scale-shift 4 + 4, the two gates), m (video only)
    cfg = LTX2Config(**LTX2_PRESETS[preset])
    D, Da = cfg.hidden, cfg.audio_hidden
    blk, rope = LTX2Block(cfg), LTX2Transformer.rope(SimpleNamespace(cfg=cfg), frames, h, w, n_audio, 24.0, None)
    blk.lora_targets = LTX2Transformer.lora_targets
    shapes = [
        (1, frames * h * w, D),
        (1, n_audio, Da),
        (1, n_txt, D),
        (1, n_txt, Da),
        (1, 6 * D),
        (1, 6 * Da),
        (1, 4 * D),
        (1, 4 * Da),
        (1, D),
        (1, Da),
        (1, D),
    ]
    return blk, shapes, lambda x, a, ctx, actx, *t: blk(x, a, ctx, actx, None, model.LTX2Mod(*t[:6]), rope, t[6])


# whole blocks from model.py at the real shapes: (name, builder, its arguments). FLUX.1 Kontext at 1024^2: 64 x 64
# packed target tokens + as many reference tokens, 512 T5 tokens. LTX-2 (benchmarks/memory.py's training videos,
# 24 fps): 512^2 x 49 frames -> 7 x 16 x 16 latent tokens, 121 frames at 768x512 -> 16 x 16 x 24; audio at 25 latent
# frames per second (51 and 126); 1024 Gemma tokens.
BLOCKS = [
    ("sd35m-512 joint block (dual attn)", sd3_block, ("sd35-medium", 0, 1024, 333)),
    ("sd35m-512 joint block", sd3_block, ("sd35-medium", 13, 1024, 333)),
    ("sd35m-1024 joint block", sd3_block, ("sd35-medium", 13, 4096, 333)),
    ("flux-kontext-1024 double block (+ref)", flux_block, ("flux-dev", "double", 8192, 512)),
    ("flux-kontext-1024 single block (+ref)", flux_block, ("flux-dev", "single", 8192, 512)),
    ("flux-dev-1024 double block", flux_block, ("flux-dev", "double", 4096, 512)),
    ("flux-dev-1024 single block", flux_block, ("flux-dev", "single", 4096, 512)),
    ("ltx2-512x512x49f block", ltx2_block, ("ltx2-19b", 7, 16, 16, 51, 1024)),
    ("ltx2-768x512x121f block", ltx2_block, ("ltx2-19b", 16, 16, 24, 126, 1024)),
]
SMOKE_BLOCKS = [
    ("tiny joint block (dual attn)", sd3_block, ("sd35-tiny", 0, 16, 7)),
    ("tiny flux double block", flux_block, ("flux-tiny", "double", 32, 7)),
    ("tiny flux single block", flux_block, ("flux-tiny", "single", 32, 7)),
    ("tiny ltx2 block", ltx2_block, ("ltx2-tiny", 2, 2, 3, 5, 7)),
]


def run_blocks(blocks, device, cpu, rows, use_compile, dtype=torch.bfloat16, lora=32):
    """Each block's rows: eager (kernels off), triton (kernels on), and with use_compile torch.compile of each (one
    compilation per variant serves both passes); lora: the adapters' rank (0: a frozen block without adapters).
    -> {block name: graph breaks under torch.compile, per compiled variant}"""
    breaks = {}
    for name, build, args in blocks:
        with torch.device(device):  # the RoPE tables too: made once on the device, never copied inside the timing
            blk, shapes, f = build(*args)
        blk.to(device, dtype).requires_grad_(False)
        if lora:  # fp32 masters on the device, trainable, as train.py adds them
            model.add_lora(blk, lora, 2 * lora)
        g = torch.Generator(device).manual_seed(0)
        # activations ~N(0, 1); conditioning vectors too; the slider vector m (last) small, as trained
        leaves = [
            (torch.randn(*s, generator=g, device=device) * (0.1 if i == len(shapes) - 1 else 1.0))
            .to(dtype)
            .requires_grad_()
            for i, s in enumerate(shapes)
        ]
        adapters = [p for p in blk.parameters() if p.requires_grad]  # their grads are reset between runs too
        variants = [("eager", "torch", False), ("triton", "triton", False)]
        if use_compile:
            variants += [("compile", "torch", True)] + ([] if cpu else [("compile+triton", "triton", True)])
        us = {}
        for impl, backend, comp in variants:
            kernels.set_backend(backend)
            fn = f
            if comp:
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                fn = torch.compile(f)
            for backward in (False, True):
                us[impl, backward] = bench_us(step(fn, leaves, backward), leaves + adapters, cpu)
            if comp:
                breaks.setdefault(name, {})[impl] = sum(torch._dynamo.utils.counters["graph_break"].values())
        kernels.set_backend("triton")
        for backward in (False, True):
            t_of = {impl: us[impl, backward] for impl, _, _ in variants}
            for impl, t in t_of.items():
                rows.append(
                    dict(
                        case=name,
                        op=type(blk).__name__,
                        pass_="fwd+bwd" if backward else "fwd",
                        impl=impl,
                        us=t,
                        gbs=None,
                        copy=None,
                        vs_eager=t_of["eager"] / t,
                        vs_compile=t_of["compile"] / t if "compile" in t_of else None,
                        err=None,
                    )
                )
            print_rows(rows[-len(t_of) :])
        if name in breaks:
            print(f"{name}: graph breaks under torch.compile: {breaks[name]}", flush=True)
    return breaks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU + interpreter, a tiny block: check the script runs")
    p.add_argument("--case", default="", help="only blocks whose name contains this")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--no-lora", action="store_true", help="frozen blocks without LoRA adapters")
    p.add_argument("--out", help="also append the rows here as JSON lines")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke (interpreter)")
    blocks = [b for b in (SMOKE_BLOCKS if args.cpu_smoke else BLOCKS) if args.case in b[0]]
    device, _ = start(args.cpu_smoke, args.out)
    rows = []
    t0 = time.time()
    run_blocks(blocks, device, args.cpu_smoke, rows, not args.no_compile, lora=0 if args.no_lora else 32)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
