"""Benchmark of kernels/ at the real model shapes, and two checks that need no GPU.

  python kernels/bench.py                 CUDA: every op, forward and forward+backward, bf16, real shapes:
                                          Triton vs the eager reference vs torch.compile of the reference
  python kernels/bench.py --cpu-smoke     CPU (TRITON_INTERPRET=1), tiny shapes: the script itself works
  python kernels/bench.py --ptx           no GPU: compile every kernel launch of the real shapes for sm_90 and
                                          report registers and spills from ptxas; fails on a compile error
                                          or a register blow-up (tests/test_kernels.py runs it)

Whole model blocks are benchmarks/blocks.py (kernels/ never imports the model). On a GPU the whole run compiles
~35 graphs with torch.compile (minutes); under a time limit split it with --case (sd35m, flux, ltx2) and
--out rows.jsonl, which keeps every row as it is measured.

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
from typing import NamedTuple, Optional  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels import adaln, qk_rope, residual  # noqa: E402


class Case(NamedTuple):  # one GPU micro-batch of one sample
    name: str
    B: int
    T: int  # tokens of the sequence the ops see
    D: int
    H: int  # heads x head_dim
    Dh: int
    rms: bool  # RMSNorm (LTX-2) or LayerNorm before the modulation
    rope: Optional[str]  # None, "interleaved" (FLUX: one [T, Dh/2] table), "split" (LTX-2: a table per head)
    m_start: int = 0  # the slider on tokens m_start..T-1 (FLUX single-stream: text first, then the image)
    per_token: bool = False  # also rows with [B, T, D] conditioning (LTX-2: a timestep per token)
    qk_across: bool = False  # qk weights [H * Dh]: one RMSNorm over all heads of a token (LTX-2)


CASES = [
    Case("sd35m-512", 1, 1024 + 333, 1536, 24, 64, False, None),  # 64x64 latent / patch 2 + 333 text tokens
    Case("sd35m-1024", 1, 4096 + 333, 1536, 24, 64, False, None),
    Case("flux-1024 single-stream", 1, 512 + 4096, 3072, 24, 128, False, "interleaved", m_start=512),  # T5 + image
    Case("flux-kontext-1024", 1, 8192 + 512, 3072, 24, 128, False, "interleaved"),  # target + reference image + T5
    Case("ltx2-video", 1, 6144, 4096, 32, 128, True, "split", per_token=True, qk_across=True),  # video stream
]
SMOKE_CASES = [
    Case("tiny", 2, 37, 48, 3, 16, False, "interleaved", m_start=5),
    Case("tiny ltx2", 1, 13, 48, 3, 16, True, "split", per_token=True, qk_across=True),
]


# ----------------------------------------------------------------------------------------------------------
# The ops at one shape: leaves (inputs that take gradients), three implementations, minimal bytes


def op_specs(case, device, dtype=torch.bfloat16):
    B, T, D, H, Dh, rms = case.B, case.T, case.D, case.H, case.Dh, case.rms
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)
    A = B * T * D * dtype.itemsize  # one activation
    # cos/sin as the models build them: FLUX one [T, Dh/2] row per token; LTX-2 split a [B, H, T, Dh/2]
    # table (each head its own frequencies), read through a transposed view
    theta = {
        None: None,
        "interleaved": torch.rand(T, Dh // 2, generator=g, device=device) * 6.3,
        "split": (torch.rand(B, H, T, Dh // 2, generator=g, device=device) * 6.3).transpose(1, 2),
    }[case.rope]
    cs = (theta.cos(), theta.sin()) if case.rope else (None, None)
    tables = 2 * 4 * theta.numel() if case.rope else 0  # fp32 cos + sin, read once per pass
    inter = case.rope != "split"
    m_range = (case.m_start, T) if case.m_start else None
    ops = []

    # conditioning [B, 6D] per sample (+ [B, T, 6D] per token): 2A/4A more per modulate pass and per-token gate
    for tok in (False, True) if case.per_token else (False,):
        suffix, c = (" (per-token)", (T,)) if tok else ("", ())
        cond = lambda: rnd(B, *c, 6 * D, scale=0.1)
        chunk = lambda cond, i: cond[..., i * D : (i + 1) * D]

        def mod(impl):
            return lambda x, cond: impl(x, chunk(cond, 0), chunk(cond, 1), 1e-6, rms)

        ops.append(
            (
                "modulate" + suffix,
                dict(x=rnd(B, T, D), cond=cond()),
                {"triton": mod(kernels.modulate), "ref": mod(kernels.modulate_ref)},
                (4 if tok else 2) * A,
                (9 if tok else 5) * A,
            )
        )

        def res(impl):  # slider form: x + gate * (y + m)
            return lambda x, y, cond, m: impl(x, chunk(cond, 2), y, m, m_range)

        ops.append(
            (
                "gated_residual+m" + ("[m_start:]" if m_range else "") + suffix,
                dict(x=rnd(B, T, D), y=rnd(B, T, D), cond=cond(), m=rnd(B, D, scale=0.1)),
                {"triton": res(kernels.gated_residual), "ref": res(kernels.gated_residual_ref)},
                (4 if tok else 3) * A,
                (9 if tok else 6) * A,
            )
        )

        def fused(impl):
            return lambda x, y, cond: impl(x, chunk(cond, 2), y, chunk(cond, 3), chunk(cond, 4), 1e-6, rms)

        ops.append(
            (
                "gated_residual_modulate" + suffix,
                dict(x=rnd(B, T, D), y=rnd(B, T, D), cond=cond()),
                {"triton": fused(kernels.gated_residual_modulate), "ref": fused(kernels.gated_residual_modulate_ref)},
                (7 if tok else 4) * A,
                (17 if tok else 10) * A,
            )
        )

    def qk(impl):
        return lambda qkv, qw, kw: impl(qkv[:, :, 0], qkv[:, :, 1], qw, kw, *cs, 1e-6, inter)

    wsize = H * Dh if case.qk_across else Dh
    ops.append(
        (
            f"qk_norm_rope ({case.rope or 'no rope'}{', across heads' if case.qk_across else ''})",
            dict(qkv=rnd(B, T, 3, H, Dh), qw=rnd(wsize), kw=rnd(wsize)),
            {"triton": qk(kernels.qk_norm_rope), "ref": qk(kernels.qk_norm_rope_ref)},
            4 * A * H * Dh // D + tables,
            10 * A * H * Dh // D + 2 * tables,
        )
    )
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
            pos = lambda f: lambda *a: f(**dict(zip(names, a)))
            fns = {"eager": pos(impls["ref"]), "triton": pos(impls["triton"])}
            if use_compile:
                torch._dynamo.reset()
                fns["compile"] = torch.compile(pos(impls["ref"]))
            err = max_err(fns["triton"], fns["eager"], leaves)
            for backward, nbytes in ((False, bytes_fwd), (True, bytes_fb)):
                us = {k: bench_us(step(f, leaves, backward), leaves, cpu) for k, f in fns.items()}
                for impl, t in us.items():
                    rows.append(
                        dict(
                            case=case.name,
                            op=op,
                            pass_="fwd+bwd" if backward else "fwd",
                            impl=impl,
                            us=t,
                            gbs=nbytes / t / 1e3,
                            copy=nbytes / t / 1e3 / copy_gbs,
                            vs_eager=us["eager"] / t,
                            vs_compile=us["compile"] / t if "compile" in us else None,
                            err=err if impl == "triton" else None,
                        )
                    )
                print_rows(rows[-len(us) :])


OUT = None  # --out: rows are appended as JSON lines as they come, so a run cut short keeps what it measured


def print_rows(rows):
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        if OUT:
            with open(OUT, "a") as fh:
                fh.write(json.dumps(r) + "\n")
        print(
            f"{r['case']:<34} {r['op']:<40} {r['pass_']:<8} {r['impl']:<15} {r['us']:>10.1f} "
            f"{fmt(r['gbs'], '8.0f'):>8} {fmt(r['copy'], '6.0%'):>6} {fmt(r['vs_eager'], '6.2f'):>6}x "
            f"{fmt(r['vs_compile'], '6.2f'):>6}x {fmt(r['err'], '.1e'):>8}",
            flush=True,
        )


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
                key = (
                    self.kernel.fn.__name__,
                    tuple(sorted(sig.items())),
                    tuple(sorted(const.items())),
                    kw["num_warps"],
                )
                launches.setdefault(key, (self.kernel, sig, const, kw["num_warps"], []))[4].append(case_name)

            return launch

    for mod in (adaln, residual, qk_rope):
        mod.launcher = Recorder
    meta = dict(device="meta", dtype=torch.bfloat16)
    for case in cases:
        case_name, B, T, D, H, Dh, rms = case[:7]
        x, m = torch.empty(B, T, D, **meta), torch.empty(B, D, **meta)
        for c in ((), (T,)) if case.per_token else ((),):  # [B, 6D], and [B, T, 6D] conditioning
            gate, shift, scale = torch.empty(B, *c, 6 * D, **meta).chunk(6, -1)[:3]
            tok = shift.dim() == 3
            adaln._launch_fwd(x, shift, scale, 1e-6, rms)
            adaln._launch_bwd(x, x, scale, 1e-6, rms, tok)
            for mm in (None, m):
                residual._launch_fwd(x, gate, x, mm, shift, scale, 1e-6, rms, True, case.m_start, T)
                residual._launch_fwd(x, gate, x, mm, None, None, 0.0, False, False, case.m_start, T)
                residual._launch_bwd(x, x, x, x, gate, mm, scale, 1e-6, rms, tok, case.m_start, T)
                residual._launch_bwd(x, None, None, x, gate, mm, None, 0.0, False, False, case.m_start, T)
        q = torch.empty(B, T, 3, H, Dh, **meta)[:, :, 0]
        w = torch.empty(H * Dh if case.qk_across else Dh, **meta)
        cs = [torch.empty(T, Dh // 2, device="meta")] * 2 if case.rope else [None, None]
        qk_rope._launch(qk_rope._qk_fwd, q, w, *cs, 1e-6, case.rope != "split")
        qk_rope._launch(qk_rope._qk_bwd, q, w, *cs, 1e-6, case.rope != "split", dout=q)
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
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"], capture_output=True, text=True
        ).stderr
        regs = int(out.split("Used ")[1].split(" registers")[0])
        spill = sum(int(s.split(" bytes spill")[0].split()[-1]) for s in out.split(",") if "bytes spill" in s)
        worst.append((regs, spill))
        cases_ = ", ".join(sorted(set(where)))
        print(f"{name:<15} warps {num_warps:>2} {const}  regs {regs:>3}  spill {spill} B  ({cases_})")
    print(
        f"RESULT {len(worst)} launches compiled for sm_90, max {max(r for r, _ in worst)} registers, "
        f"largest spill {max(s for _, s in worst)} B"
    )
    sys.exit(1 if max(s for _, s in worst) >= 256 else 0)  # a few bytes of stack are harmless; a blow-up is not


# ----------------------------------------------------------------------------------------------------------


def start(cpu, out):
    # the run's header: device, versions, git, copy bandwidth, column names; --out also gets it as a JSON line.
    # Shared with benchmarks/blocks.py, so both print one table format. -> device, copy GB/s
    global OUT
    OUT = out
    device = torch.device("cpu" if cpu else "cuda")
    kernels.set_backend("triton")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dev = "CPU (TRITON_INTERPRET=1)" if cpu else torch.cuda.get_device_name()
    print(f"device {dev} | torch {torch.__version__} | triton {triton.__version__} | git {git.strip()} | bf16")
    copy_gbs = copy_bandwidth(device, cpu)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(
        f"{'case':<34} {'op':<40} {'pass':<8} {'impl':<15} {'us':>10} {'GB/s':>8} {'%copy':>6} {'vs eager':>7} "
        f"{'vs compile':>7} {'max err':>8}"
    )
    if OUT:
        with open(OUT, "a") as fh:
            fh.write(
                json.dumps(
                    dict(
                        device=dev,
                        copy_gbs=copy_gbs,
                        git=git.strip(),
                        torch=torch.__version__,
                        triton=triton.__version__,
                    )
                )
                + "\n"
            )
    return device, copy_gbs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU + interpreter, tiny shapes: check the script runs")
    p.add_argument("--ptx", action="store_true", help="compile all launches for sm_90 offline, report registers")
    p.add_argument("--case", default="", help="only cases whose name contains this")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    p.add_argument("--out", help="also append the rows here as JSON lines")
    args = p.parse_args()
    cases = [c for c in (SMOKE_CASES if args.cpu_smoke else CASES) if args.case in c.name]
    if args.ptx:
        ptx_report(cases)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke (interpreter) or --ptx (offline compile check)")
    device, copy_gbs = start(args.cpu_smoke, args.out)
    rows = []
    t0 = time.time()
    run_ops(cases, device, args.cpu_smoke, copy_gbs, rows, not args.no_compile)
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
