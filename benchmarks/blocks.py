"""Whole model blocks with the kernels on and off, at the real shapes: the end-to-end check of kernels/.

  python benchmarks/blocks.py              CUDA, bf16: each block forward and forward+backward, eager (kernels
                                           off) vs kernels on vs torch.compile (off / on)
  python benchmarks/blocks.py --cpu-smoke  CPU (TRITON_INTERPRET=1), a tiny block: the script itself works

LoRA-style: frozen weights, gradients w.r.t. the activations only. The per-op rows are kernels/bench.py, whose
timing and table this uses (same columns; GB/s is not defined for a whole block). Target (issue 4): the joint
block forward+backward >= 1.3x eager and never slower than torch.compile.
"""
import os
import sys

if __name__ == "__main__" and "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and kernels/ are imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.bench import bench_us, print_rows, start, step  # noqa: E402
from model import SD3_PRESETS, JointBlock, SD3Config  # noqa: E402

# whole SD3.5 joint blocks from model.py: (name, preset, block index, image tokens, text tokens).
# FLUX / LTX-2 blocks: add them here once model.py has them.
BLOCKS = [("sd35m-512 joint block (dual attn)", "sd35-medium", 0, 1024, 333),
          ("sd35m-512 joint block", "sd35-medium", 13, 1024, 333),
          ("sd35m-1024 joint block", "sd35-medium", 13, 4096, 333)]
SMOKE_BLOCKS = [("tiny joint block (dual attn)", "sd35-tiny", 0, 16, 7)]


def run_blocks(blocks, device, cpu, rows, use_compile, dtype=torch.bfloat16):
    for name, preset, i, n_img, n_txt in blocks:
        cfg = SD3Config(**SD3_PRESETS[preset])
        blk = JointBlock(cfg, i).to(device, dtype).requires_grad_(False)
        g = torch.Generator(device).manual_seed(0)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype).requires_grad_()
        D = cfg.hidden
        leaves = [rnd(1, n_txt, D), rnd(1, n_img, D), rnd(1, D), rnd(1, D, scale=0.1)]  # ctx, x, c, m (slider)
        f = lambda ctx, x, c, m: tuple(t for t in blk(ctx, x, c, m) if t is not None)
        variants = [("eager", "torch", False), ("triton", "triton", False)]
        if use_compile:
            variants += [("compile", "torch", True)] + ([] if cpu else [("compile+triton", "triton", True)])
        for backward in (False, True):
            us = {}
            for impl, backend, comp in variants:
                kernels.set_backend(backend)
                torch._dynamo.reset()
                us[impl] = bench_us(step(torch.compile(f) if comp else f, leaves, backward), leaves, cpu)
            kernels.set_backend("triton")
            for impl, t in us.items():
                rows.append(dict(case=name, op="JointBlock", pass_="fwd+bwd" if backward else "fwd", impl=impl, us=t,
                                 gbs=None, copy=None, vs_eager=us["eager"] / t,
                                 vs_compile=us["compile"] / t if "compile" in us else None, err=None))
            print_rows(rows[-len(us):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU + interpreter, a tiny block: check the script runs")
    p.add_argument("--case", default="", help="only blocks whose name contains this")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--out", help="also append the rows here as JSON lines")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke (interpreter)")
    blocks = [b for b in (SMOKE_BLOCKS if args.cpu_smoke else BLOCKS) if args.case in b[0]]
    device, _ = start(args.cpu_smoke, args.out)
    rows = []
    t0 = time.time()
    run_blocks(blocks, device, args.cpu_smoke, rows, not args.no_compile)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
