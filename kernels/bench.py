"""Benchmark of kernels/ at the real model shapes, and two checks that need no GPU.

  python kernels/bench.py                 CUDA: every op, forward and forward+backward, bf16, real shapes:
                                          Triton vs the eager reference vs torch.compile of the reference
  python kernels/bench.py --cpu-smoke     CPU (TRITON_INTERPRET=1), tiny shapes: the script itself works
  python kernels/bench.py --ptx           no GPU: compile every kernel launch of the real shapes for sm_90 and
                                          report registers and spills from ptxas; fails on a compile error
                                          or a register blow-up (tests/test_kernels.py runs it)

On a GPU the whole run compiles ~20 graphs with torch.compile (minutes); under a time limit split it with
--case (sd35m, flux, ltx2, "joint block") and --out rows.jsonl, which keeps every row as it is measured.

All ops are memory-bound, so the table gives GB/s from the minimal bytes each op must move (A = one [T, D]
activation: modulate fwd reads x and writes y = 2A) and the fraction of a device-to-device copy measured in
the same run. Targets (issue 4): each op >= 80% of copy bandwidth; the joint block forward+backward >= 1.3x
eager and never slower than torch.compile.
"""
import os
import sys

if __name__ == "__main__" and "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and kernels/ are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels import adaln, qk_rope, residual  # noqa: E402

# (name, B, tokens, D, heads, head_dim, RMSNorm?, RoPE) per GPU micro-batch of one sample
CASES = [
    ("sd35m-512", 1, 1024 + 333, 1536, 24, 64, False, None),  # 64x64 latent / patch 2 + 333 text tokens
    ("sd35m-1024", 1, 4096 + 333, 1536, 24, 64, False, None),
    ("flux-kontext-1024", 1, 8192 + 512, 3072, 24, 128, False, "interleaved"),  # target + reference image + T5
    ("ltx2-video", 1, 6144, 4096, 32, 128, True, "split"),  # video stream
]
SMOKE_CASES = [("tiny", 2, 37, 48, 3, 16, False, "interleaved")]
# whole SD3.5 joint blocks from model.py: (name, preset, block index, image tokens, text tokens)
BLOCKS = [("sd35m-512 joint block (dual attn)", "sd35-medium", 0, 1024, 333),
          ("sd35m-512 joint block", "sd35-medium", 13, 1024, 333),
          ("sd35m-1024 joint block", "sd35-medium", 13, 4096, 333)]
SMOKE_BLOCKS = [("tiny joint block (dual attn)", "sd35-tiny", 0, 16, 7)]


# ----------------------------------------------------------------------------------------------------------
# The ops at one shape: leaves (inputs that take gradients), three implementations, minimal bytes


def op_specs(case, device, dtype=torch.bfloat16):
    name, B, T, D, H, Dh, rms, rope = case
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)
    A = B * T * D * dtype.itemsize  # one activation
    theta = torch.rand(1, T, 1, Dh // 2, generator=g, device=device) * 6.3 if rope else None
    cs = (theta.cos(), theta.sin()) if rope else (None, None)
    inter = rope != "split"
    ops = []

    def mod(impl):
        return lambda x, cond: impl(x, cond[:, :D], cond[:, D:2 * D], 1e-6, rms)
    ops.append(("modulate", dict(x=rnd(B, T, D), cond=rnd(B, 6 * D, scale=0.1)),
                {"triton": mod(kernels.modulate), "ref": mod(kernels.modulate_ref)}, 2 * A, 5 * A))

    def res(impl):  # slider form: x + gate * (y + m)
        return lambda x, y, cond, m: impl(x, cond[:, 2 * D:3 * D], y, m)
    ops.append(("gated_residual+m", dict(x=rnd(B, T, D), y=rnd(B, T, D), cond=rnd(B, 6 * D, scale=0.1),
                                        m=rnd(B, D, scale=0.1)),
                {"triton": res(kernels.gated_residual), "ref": res(kernels.gated_residual_ref)}, 3 * A, 6 * A))

    def fused(impl):
        return lambda x, y, cond: impl(x, cond[:, 2 * D:3 * D], y, cond[:, 3 * D:4 * D], cond[:, 4 * D:5 * D],
                                       1e-6, rms)
    ops.append(("gated_residual_modulate", dict(x=rnd(B, T, D), y=rnd(B, T, D), cond=rnd(B, 6 * D, scale=0.1)),
                {"triton": fused(kernels.gated_residual_modulate), "ref": fused(kernels.gated_residual_modulate_ref)},
                4 * A, 10 * A))

    def qk(impl):
        return lambda qkv, qw, kw: impl(qkv[:, :, 0], qkv[:, :, 1], qw, kw, *cs, 1e-6, inter)
    ops.append((f"qk_norm_rope ({rope or 'no rope'})", dict(qkv=rnd(B, T, 3, H, Dh), qw=rnd(Dh), kw=rnd(Dh)),
                {"triton": qk(kernels.qk_norm_rope), "ref": qk(kernels.qk_norm_rope_ref)}, 4 * A * H * Dh // D,
                10 * A * H * Dh // D))
    return ops


# ----------------------------------------------------------------------------------------------------------
# Timing


def bench_us(fn, leaves, cpu):
    for t in leaves:
        t.grad = None
    if cpu:  # the interpreter: a couple of calls, wall clock
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=leaves, return_mode="median") * 1e3


def step(f, leaves, backward):
    outs = f(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.ones_like(o) for o in outs] if backward else None

    def run():
        o = f(*leaves)
        if backward:
            torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)
    return run


def copy_bandwidth(device, cpu):
    n = (1 << 20) if cpu else (1 << 28)  # 512 MiB of bf16 on the GPU
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), [], cpu)
    return 2 * src.numel() * src.element_size() / us / 1e3  # GB/s


def max_err(f, ref, leaves):
    with torch.no_grad():
        a = f(*leaves)
        b = ref(*[t.float() for t in leaves])
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def run_ops(cases, device, cpu, copy_gbs, rows, use_compile):
    for case in cases:
        for op, leaves, impls, bytes_fwd, bytes_fb in op_specs(case, device):
            names = list(leaves)
            leaves = [t.requires_grad_() if t.is_floating_point() else t for t in leaves.values()]
            pos = lambda f: (lambda *a: f(**dict(zip(names, a))))
            fns = {"eager": pos(impls["ref"]), "triton": pos(impls["triton"])}
            if use_compile:
                torch._dynamo.reset()
                fns["compile"] = torch.compile(pos(impls["ref"]))
            err = max_err(fns["triton"], fns["eager"], leaves)
            for backward, nbytes in ((False, bytes_fwd), (True, bytes_fb)):
                us = {k: bench_us(step(f, leaves, backward), leaves, cpu) for k, f in fns.items()}
                for impl, t in us.items():
                    rows.append(dict(case=case[0], op=op, pass_="fwd+bwd" if backward else "fwd", impl=impl, us=t,
                                     gbs=nbytes / t / 1e3, copy=nbytes / t / 1e3 / copy_gbs,
                                     vs_eager=us["eager"] / t,
                                     vs_compile=us["compile"] / t if "compile" in us else None,
                                     err=err if impl == "triton" else None))
                print_rows(rows[-len(us):])


def run_blocks(blocks, device, cpu, rows, use_compile, dtype=torch.bfloat16):
    # Whole SD3.5 joint blocks from model.py (LoRA-style: frozen weights, gradients w.r.t. the activations).
    # FLUX / LTX-2 blocks: add them here once model.py has them.
    try:
        from model import SD3_PRESETS, JointBlock, SD3Config
    except ImportError as e:
        print(f"joint block rows skipped: {e}")
        return
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


OUT = None  # --out: rows are appended as JSON lines as they come, so a run cut short keeps what it measured


def print_rows(rows):
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        if OUT:
            with open(OUT, "a") as fh:
                fh.write(json.dumps(r) + "\n")
        print(f"{r['case']:<34} {r['op']:<27} {r['pass_']:<8} {r['impl']:<15} {r['us']:>10.1f} "
              f"{fmt(r['gbs'], '8.0f'):>8} {fmt(r['copy'], '6.0%'):>6} {fmt(r['vs_eager'], '6.2f'):>6}x "
              f"{fmt(r['vs_compile'], '6.2f'):>6}x {fmt(r['err'], '.1e'):>8}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# --ptx: record the kernel launches the ops make at the real shapes (meta tensors, nothing runs), compile each
# for sm_90 and read registers/spills from ptxas. Catches interpreter-only code and register blow-ups offline.


def record_launches(cases):
    launches = {}

    class Recorder:  # stands in for kernels._common.launcher (torch.library.wrap_triton)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                sig = {n: _ty(a) for n, a in zip(self.kernel.arg_names, args)}
                const = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
                sig.update({k: "constexpr" for k in const})
                key = (self.kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())),
                       kw["num_warps"])
                launches.setdefault(key, (self.kernel, sig, const, kw["num_warps"], []))[4].append(case_name)
            return launch

    for mod in (adaln, residual, qk_rope):
        mod.launcher = Recorder
    meta = dict(device="meta", dtype=torch.bfloat16)
    for case_name, B, T, D, H, Dh, rms, rope in cases:
        x, cond, m = torch.empty(B, T, D, **meta), torch.empty(B, 6 * D, **meta), torch.empty(B, D, **meta)
        gate, shift, scale = cond[:, :D], cond[:, D:2 * D], cond[:, 2 * D:3 * D]
        adaln._launch_fwd(x, shift, scale, 1e-6, rms)
        adaln._launch_bwd(x, x, scale, 1e-6, rms)
        for mm in (None, m):
            residual._launch_fwd(x, gate, x, mm, shift, scale, 1e-6, rms, modulate=True)
            residual._launch_fwd(x, gate, x, mm, None, None, 0.0, False, modulate=False)
            residual._launch_bwd(x, x, x, x, gate, mm, scale, 1e-6, rms)
            residual._launch_bwd(x, None, None, x, gate, mm, None, 0.0, False)
        q = torch.empty(B, T, 3, H, Dh, **meta)[:, :, 0]
        w = torch.empty(Dh, **meta)
        cs = [torch.empty(1, T, 1, Dh // 2, device="meta")] * 2 if rope else [None, None]
        qk_rope._launch(qk_rope._qk_fwd, q, w, *cs, 1e-6, rope != "split")
        qk_rope._launch(qk_rope._qk_bwd, q, w, *cs, 1e-6, rope != "split", dout=q)
    return launches


def _ty(a):
    if isinstance(a, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[a.dtype]
    return "fp32" if isinstance(a, float) else "i32"


def ptx_report(cases):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    try:
        ptxas = get_ptxas(90).path
        subprocess.run([ptxas, "--version"], check=True, capture_output=True)
    except Exception as e:  # noqa: BLE001
        print(f"RESULT skipped: Triton's NVIDIA backend / ptxas is not usable here ({e})")
        sys.exit(3)
    worst, tmp = [], tempfile.mkdtemp(prefix="ptx_")
    for (name, *_), (kernel, sig, const, num_warps, where) in record_launches(cases).items():
        k = triton.compile(ASTSource(kernel, sig, const), target=target, options={"num_warps": num_warps})
        path = os.path.join(tmp, f"{name}.ptx")
        with open(path, "w") as fh:
            fh.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                             capture_output=True, text=True).stderr
        regs = int(out.split("Used ")[1].split(" registers")[0])
        spill = sum(int(s.split(" bytes spill")[0].split()[-1]) for s in out.split(",") if "bytes spill" in s)
        worst.append((regs, spill))
        cases_ = ", ".join(sorted(set(where)))
        print(f"{name:<15} warps {num_warps:>2} {const}  regs {regs:>3}  spill {spill} B  ({cases_})")
    print(f"RESULT {len(worst)} launches compiled for sm_90, max {max(r for r, _ in worst)} registers, "
          f"largest spill {max(s for _, s in worst)} B")
    sys.exit(1 if max(s for _, s in worst) >= 256 else 0)  # a few bytes of stack are harmless; a blow-up is not


# ----------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU + interpreter, tiny shapes: check the script runs")
    p.add_argument("--ptx", action="store_true", help="compile all launches for sm_90 offline, report registers")
    p.add_argument("--case", default="", help="only cases/blocks whose name contains this")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--no-blocks", action="store_true", help="skip the whole joint block rows")
    p.add_argument("--out", help="also append the rows here as JSON lines")
    args = p.parse_args()
    cases = [c for c in (SMOKE_CASES if args.cpu_smoke else CASES) if args.case in c[0]]
    blocks = [b for b in (SMOKE_BLOCKS if args.cpu_smoke else BLOCKS) if args.case in b[0]]
    if args.ptx:
        ptx_report(cases)
    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke (interpreter) or --ptx (offline compile check)")
    device = torch.device("cpu" if cpu else "cuda")
    kernels.set_backend("triton")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dev = "CPU (TRITON_INTERPRET=1)" if cpu else torch.cuda.get_device_name()
    print(f"device {dev} | torch {torch.__version__} | triton {triton.__version__} | git {git.strip()} | bf16")
    copy_gbs = copy_bandwidth(device, cpu)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'case':<34} {'op':<27} {'pass':<8} {'impl':<15} {'us':>10} {'GB/s':>8} {'%copy':>6} {'vs eager':>7} "
          f"{'vs compile':>7} {'max err':>8}")
    global OUT
    OUT = args.out
    if OUT:
        with open(OUT, "a") as fh:
            fh.write(json.dumps(dict(device=dev, copy_gbs=copy_gbs, git=git.strip(), torch=torch.__version__,
                                     triton=triton.__version__)) + "\n")
    rows = []
    t0 = time.time()
    run_ops(cases, device, cpu, copy_gbs, rows, not args.no_compile)
    if not args.no_blocks:
        run_blocks(blocks, device, cpu, rows, not args.no_compile)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
