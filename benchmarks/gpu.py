"""The one command for a GPU: every check and measurement this project needs a GPU for, in one run, one report.

  python benchmarks/gpu.py [--out gpu-report] [--budget 270]   one CUDA GPU (H100: about 5 minutes); prints the report
                                                                and writes it to --out as it goes
  python benchmarks/gpu.py --cpu-smoke                          CPU, toy sizes, Triton's interpreter: every section
                                                                runs (tests/test_gpu_script.py, in CI; there the
                                                                Triton path runs where the interpreter is quick
                                                                enough: the kernels, SD3.5's train step, the bench)

Sections, most important first; each one's results are written to <out>/<section>.jsonl and appended to
<out>/report.md the moment the section ends, so a run cut short (a timeout, a lost machine) keeps what it measured.
Past --budget seconds the remaining items are skipped and marked so.
  kernels  every Triton kernel against its PyTorch reference on the device, fp32 and bf16, forward and every gradient,
           at odd shapes: the error against its bound, PASS / FAIL
  train    one step of train.py's real loop (rollout, rewards, advantages, the two-pass update, old policy / EMA,
           checkpoint, a 2-point evaluation) per backbone at full width and reduced depth, random bf16 weights with
           fp32 adapters, --kernels torch vs triton on the same seed: loss, KL and grad norm of the first step side by
           side, the time of the second (warm) step, the peak memory
  memory   benchmarks/memory.py's plan (meta device, no GPU) next to the same steps on the GPU: the tracker's count
           and torch.cuda.max_memory_allocated, full size (uninitialised weights); --offload's host <-> GPU moves of
           2 GiB (seconds, GB/s against the plan's assumed PCIe rate)
  bench    kernels/bench.py's table at the real shapes (eager vs Triton; the compile columns are the blocks section's)
  blocks   benchmarks/blocks.py with LoRA on, as training runs the blocks: eager / kernels / torch.compile / compile +
           kernels, and how many graph breaks the Triton custom ops cause under torch.compile (0 = they trace)
"""

import os
import sys

SMOKE = __name__ == "__main__" and "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and kernels/ are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import blocks as block_bench  # noqa: E402
import memory  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
import model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from kernels import bench  # noqa: E402

SECTIONS = ("kernels", "train", "memory", "bench", "blocks")


class Report:
    """Sections of rows: printed as they come, each section written to <out>/<name>.jsonl and appended to report.md
    when it ends; the time budget shared by all sections."""

    def __init__(self, out, budget):
        self.out, self.deadline, self.t0, self.failed = out, time.time() + budget, time.time(), 0
        os.makedirs(out, exist_ok=True)
        for f in ["report.md"] + [s + ".jsonl" for s in SECTIONS]:  # a fresh report; nothing else in the folder
            if os.path.isfile(os.path.join(out, f)):
                os.remove(os.path.join(out, f))

    def left(self):
        return self.deadline - time.time()

    def section(self, name, title, rows, notes=()):
        with open(os.path.join(self.out, name + ".jsonl"), "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        cols = list(dict.fromkeys(k for r in rows for k in r))
        cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        lines = [f"## {name}: {title}", ""] + list(notes) + ([""] if notes else [])
        if rows:
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        text = "\n".join(lines) + "\n\n"
        with open(os.path.join(self.out, "report.md"), "a") as fh:
            fh.write(text)
        print("\n" + text, flush=True)


def header(device):
    import triton

    git = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (TRITON_INTERPRET=1)"
    return [f"device {name} | torch {torch.__version__} | triton {triton.__version__} | git {git}"]


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------------------
# kernels: Triton against the references, on the device


KERNEL_CASES = [
    bench.Case("odd", 3, 37, 200, 5, 40, False, "interleaved", m_start=5, per_token=True),
    bench.Case("odd ltx2", 2, 29, 160, 4, 40, True, "split", per_token=True, qk_across=True),
    bench.Case("odd no rope", 2, 77, 96, 3, 32, False, None),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max |err| / max |ref|, per output and gradient


def check_kernels(device, report):
    """Every op of kernels/bench.py's op_specs at odd shapes: the Triton op and its reference on the same leaves
    (the reference computing in fp32), forward outputs and the gradient of every leaf under a random upstream
    gradient, compared relative to the reference's largest value."""
    rows = []
    kernels.set_backend("triton")
    for case in KERNEL_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            for op, leaves, impls, _, _ in bench.op_specs(case, device, dtype):
                names = list(leaves)
                g = torch.Generator(device).manual_seed(0)
                results = {}
                for impl in ("triton", "ref"):
                    xs = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in leaves.items()}
                    outs = impls[impl](**xs)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    if impl == "triton":
                        ups = [torch.randn(o.shape, generator=g, device=device).to(o.dtype) for o in outs]
                    torch.autograd.backward(outs, ups)
                    results[impl] = [o.detach() for o in outs] + [xs[k].grad for k in names if xs[k].requires_grad]
                err = max(
                    (a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-12)
                    for a, b in zip(results["triton"], results["ref"])
                )
                ok = err <= TOLERANCE[dtype] and all(torch.isfinite(t).all() for t in results["triton"])
                rows.append(
                    dict(
                        case=case.name,
                        op=op,
                        dtype=str(dtype)[6:],
                        tensors=len(results["ref"]),
                        rel_err=err,
                        bound=TOLERANCE[dtype],
                        result="PASS" if ok else "FAIL",
                    )
                )
    failed = sum(r["result"] == "FAIL" for r in rows)
    report.failed += failed
    report.section(
        "kernels",
        "Triton vs reference (forward and every gradient)",
        rows,
        [f"{len(rows) - failed} of {len(rows)} PASS" + (f", {failed} FAIL" if failed else "")],
    )


# ----------------------------------------------------------------------------------------------------------------
# train: one step of the real loop per backbone, on a synthetic setup (random weights, random conditioning)


def shapes(kind, smoke):
    """-> (model class, config at full width and reduced depth, x0 parts, conditioning shapes per item); smoke: the
    tiny presets. Full size: SD3.5 medium at 512^2 (2 blocks: a dual-attention one and the last), FLUX.1 Kontext at
    512^2 + a 512^2 reference (1 double + 2 single blocks), LTX-2 at 512^2 x 49 frames (2 blocks)."""
    if kind == "sd35":
        cfg = model.SD3Config(**model.SD3_PRESETS["sd35-tiny" if smoke else "sd35-medium"])
        cfg = replace(cfg, depth=2, dual_attention_layers=(0,))
        h = 16 if smoke else 64
        return (
            model.SD3Transformer,
            cfg,
            [(cfg.in_channels, h, h)],
            dict(context=(8 if smoke else 333, cfg.context_dim), pooled=(cfg.pooled_dim,)),
        )
    if kind == "flux-kontext":
        cfg = replace(
            model.FluxConfig(**model.FLUX_PRESETS["flux-tiny" if smoke else "flux-dev"]), depth=1, depth_single=2
        )
        C, h = cfg.in_channels // 4, 8 if smoke else 64
        return (
            model.FluxTransformer,
            cfg,
            [(C, h, h)],
            dict(context=(8 if smoke else 512, cfg.context_dim), pooled=(cfg.pooled_dim,), guidance=(), ref=(C, h, h)),
        )
    cfg = replace(model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny" if smoke else "ltx2-19b"]), depth=2)
    mel = cfg.audio_in_channels // cfg.audio_channels
    video, audio = (
        ((cfg.in_channels, 2, 4, 4), (cfg.audio_channels, 3, mel))
        if smoke
        else ((cfg.in_channels, 7, 16, 16), (cfg.audio_channels, 51, mel))
    )
    L = 8 if smoke else 1024
    return (
        model.LTX2Transformer,
        cfg,
        [video, audio],
        dict(context=(L, cfg.caption_channels), context_audio=(L, cfg.caption_channels)),
    )


def synthetic_setup(kind, smoke):
    # train.py's tiny_setup signature: a Setup of 4 items with random conditioning; decode maps the first 3 latent
    # channels to images through a sigmoid, so the tiny rewards have pictures to score
    def setup(cfg, M, device):
        cls, mcfg, parts, cond = shapes(kind, smoke)
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            net = cls(mcfg)
        n = 4
        cond = {k: (torch.full((n,), 2.5) if s == () else torch.randn(n, *s, generator=g)) for k, s in cond.items()}
        image = lambda z: torch.sigmoid(z[:, :3].float())
        if len(parts) == 1:
            return train.Setup(net, [f"item {i}" for i in range(n)], cond, [{}] * n, [0], parts[0], image, {})
        pack, unpack = sample.ltx2_packing(*parts)
        return train.Setup(
            net,
            [f"item {i}" for i in range(n)],
            cond,
            [{}] * n,
            [0],
            (sum(torch.Size(p).numel() for p in parts),),
            lambda x0: image(unpack(x0)[0]).transpose(1, 2),
            {},
            pack=pack,
            unpack=unpack,
            video=True,
        )

    return setup


TRAIN_AGREEMENT = 0.05  # bf16 rollouts through either kernel set differ by roundings (CPU smoke: up to 6e-3)
STEP = re.compile(r"^step (\d+)/\d+ \| .* \| loss (\S+) kl (\S+) gnorm (\S+) \| (\S+)s$")


def train_flags(name, device, backend, smoke, out):
    """train.py's flags for two bf16 steps of `name` on `device` with the `backend` kernels (full width at 512 px)"""
    few = "--steps 2 --prompts-per-step 2 --prefs-per-prompt 1 --group-size 2 --sample-steps 4 --batch 2"
    few += " --eval-points 2 --eval-prompts 1 --grad-ckpt --rewards tiny_photo,tiny_sketch"
    return [
        *("--backbone", name, "--tiny", "--device", device.type, "--dtype", "bf16", "--kernels", backend),
        *few.split(),
        *("--lora-rank", "4" if smoke else "32", "--size", "16" if smoke else "512", "--out", out),
    ]


def train_result(out):
    """Step 1's loss, KL and grad norm, step 2's time, the checkpoint's adapter dtypes: from a finished run `out`"""
    steps = [STEP.match(line.strip()) for line in open(os.path.join(out, "log.txt"))]
    steps = [m for m in steps if m]
    ck = model.read_safetensors(os.path.join(out, "checkpoint.safetensors"))[0]
    masters = {v.dtype for k, v in ck.items() if k != "rng.train"}
    return dict(
        loss=float(steps[0][2]),
        kl=float(steps[0][3]),
        gnorm=float(steps[0][4]),
        step2_s=float(steps[1][5]),
        adapters=",".join(sorted(str(d)[6:] for d in masters)),
    )


def train_steps(device, report, smoke):
    rows = []
    for kind in ("sd35", "flux-kontext", "ltx2"):
        row = train.BACKBONES[kind]  # its tiny world swapped for full-width synthetic data, in this process only
        tiny = dict(row["tiny"], out="", heldout="")
        train.BACKBONES[kind] = dict(row, tiny_setup=synthetic_setup(kind, smoke), tiny=tiny)
        try:
            # the interpreter runs Triton kernels ~100x slower than the references: the CPU smoke compares the two
            # backends on the SD3.5 step only (the same code path as the others')
            for backend in ("torch", "triton") if not smoke or kind == "sd35" else ("torch",):
                if report.left() < 30:
                    rows.append(dict(backbone=kind, kernels=backend, result="skipped (time budget)"))
                    continue
                out = os.path.join(report.out, f"train-{kind}-{backend}")
                if os.path.isdir(out):
                    import shutil

                    shutil.rmtree(out)
                peak_reset(device)
                t0 = time.time()
                try:
                    train.main(train_flags(kind, device, backend, smoke, out))
                except BaseException as e:  # noqa: BLE001 (SystemExit too: train.main's one-line errors) the next run goes on
                    report.failed += 1
                    rows.append(dict(backbone=kind, kernels=backend, result=f"FAIL: {type(e).__name__}: {e}"[:300]))
                    peak_reset(device)
                    continue
                run_s, peak = time.time() - t0, peak_gib(device)
                rows.append(dict(backbone=kind, kernels=backend, **train_result(out), run_s=run_s, peak_gib=peak))
        finally:
            train.BACKBONES[kind] = row
    notes = [
        "Step 1's loss, KL and grad norm with the PyTorch references and with the Triton kernels (same seed and "
        "weights; bf16 rounding differs, so they agree to a few digits, not bit for bit); step 2's time is warm "
        "(step 1 includes Triton's JIT); peak: the whole run (setup, 2 steps, evaluation); adapters: the dtypes "
        "in the checkpoint (fp32 masters)."
    ]
    for kind in ("sd35", "flux-kontext", "ltx2"):
        pair = [r for r in rows if r["backbone"] == kind and "loss" in r]
        if len(pair) == 2:
            rel = max(abs(pair[0][k] - pair[1][k]) / max(abs(pair[0][k]), 1e-12) for k in ("loss", "gnorm"))
            ok = rel <= TRAIN_AGREEMENT
            report.failed += not ok
            notes.append(
                f"{kind}: torch vs triton, largest relative difference of loss and grad norm {rel:.2e}: "
                + ("PASS" if ok else f"FAIL (more than {TRAIN_AGREEMENT})")
            )
    report.section("train", "one step of train.py's loop per backbone, full width, reduced depth", rows, notes)


# ----------------------------------------------------------------------------------------------------------------
# memory: the meta-device plan next to the GPU


def tiny_settings():
    # memory.py's settings at toy size (--cpu-smoke): its tests' tiny nets, micro-batch 2
    sd3, ltx = (
        model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2),
        model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny"], pref_dim=2),
    )
    vae = (lambda: model.AutoencoderKL(channels=(8, 16), layers=1, latent=4, groups=4), (2, 4, 8, 8))
    return [
        dict(
            name="sd35-tiny B2",
            net=(model.SD3Transformer, sd3),
            inputs=memory.sd3_inputs(sd3, 2, 8, 7),
            vae=vae,
            aux=(),
            encoders=(),
            step=(4, 3),
            x0=("x",),
        ),
        dict(
            name="ltx2-tiny B2",
            net=(model.LTX2Transformer, ltx),
            inputs=memory.ltx2_inputs(ltx, 2, 17, 64, 96, 7),
            vae=vae,
            aux=(),
            encoders=(),
            step=(4, 3),
            x0=("video", "audio"),
        ),
    ]


def memory_plan(device, report, smoke):
    rows = []
    settings = tiny_settings() if smoke else memory.settings()[:3]
    for s in settings:
        if report.left() < 60:
            rows.append(dict(setting=s["name"], result="skipped (time budget)"))
            continue
        kernels.set_backend("torch")  # the plan runs the references on meta tensors
        meta = memory.plan(s)
        kernels.set_backend("torch" if smoke else "triton")  # the interpreter would take minutes at toy size
        peak_reset(device)
        real = memory.plan(s, device.type)
        g = lambda b: None if b is None else b / 2**30
        for phase in ("rollout", "update", "decode"):
            rows.append(
                dict(
                    setting=s["name"],
                    phase=phase,
                    plan_meta_gib=g(meta[phase]),
                    tracked_gib=g(real[phase]),
                    allocator_gib=g(real[phase + "_cuda"]),
                )
            )
        rows.append(dict(setting=s["name"], phase="peak (plan)", plan_meta_gib=g(meta["peak"])))
        del real
        peak_reset(device)
    if report.left() > 30:
        rows += offload_moves(device, smoke)
    report.section(
        "memory",
        "memory.py's plan vs the GPU (GiB above the resident weights)",
        rows,
        [
            "plan_meta: memory.py on the meta device (the README's table); tracked: the same live-bytes count on the "
            "device's tensors (on a GPU with the Triton kernels instead of the references); allocator: "
            "torch.cuda.max_memory_allocated above the resident state for the same step (None off a GPU)."
        ],
    )


def offload_moves(device, smoke):
    """--offload's moves (train.Phases) of a frozen bf16 stack of Linears (2 GiB; toy on a CPU, where nothing moves):
    out to the host the first time (pinned copies made and filled), in, out again (frozen: its host copy, no copy), in.
    -> rows of GB and GB/s, against memory.py's assumed PCIE."""
    width, depth = (256, 4) if smoke else (4096, 64)
    stack = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(depth)])
    stack = stack.to(device, torch.bfloat16).requires_grad_(False)
    gb = sum(p.numel() * p.element_size() for p in stack.parameters()) / 1e9
    phases, rows = train.Phases(device, True, net=[stack], other=[]), []
    for what, phase in [
        ("out, first (pins)", "other"),
        ("in", "net"),
        ("out (frozen: no copy)", "other"),
        ("in", "net"),
    ]:
        peak_reset(device)
        t0 = time.perf_counter()
        phases.enter(phase)
        peak_reset(device)  # (synchronizes)
        dt = time.perf_counter() - t0
        rows.append(dict(setting="offload move", phase=what, gb=gb, seconds=dt, gb_per_s=gb / dt if dt else None))
    rows.append(dict(setting="offload move", phase="assumed by memory.py", gb_per_s=memory.PCIE / 1e9))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# bench and blocks: the timing tables


def bench_table(device, report, smoke, copy_gbs):
    rows = []
    cases = bench.SMOKE_CASES if smoke else bench.CASES
    for case in cases:
        if report.left() < 20:
            rows.append(dict(case=case.name, impl="skipped (time budget)"))
            continue
        bench.run_ops([case], device, smoke, copy_gbs, rows, use_compile=False)
    report.section("bench", "kernels/bench.py at the real shapes (bf16)", rows, [f"device copy {copy_gbs:.0f} GB/s"])


def blocks_table(device, report, smoke):
    rows, breaks = [], {}
    chosen = (
        block_bench.SMOKE_BLOCKS[:1]
        if smoke
        else [
            b
            for b in block_bench.BLOCKS
            if b[0] in ("sd35m-1024 joint block", "flux-kontext-1024 double block (+ref)", "ltx2-512x512x49f block")
        ]
    )
    for blk in chosen:
        if report.left() < 60:
            rows.append(dict(case=blk[0], impl="skipped (time budget)"))
            continue
        breaks.update(block_bench.run_blocks([blk], device, smoke, rows, use_compile=True, lora=4 if smoke else 32))
    report.section(
        "blocks",
        "whole blocks with LoRA r32 (fwd, fwd+bwd; us)",
        rows,
        [
            f"graph breaks under torch.compile per block: {json.dumps(breaks)}"
            + (" (compile + Triton kernels needs a GPU: not on this CPU)" if smoke else "")
        ],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, toy sizes, the interpreter: every section runs")
    p.add_argument("--out", default="gpu-report", help="folder for report.md and one <section>.jsonl per section")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds; later items are skipped past it (default 270 on a GPU, none with --cpu-smoke)",
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help="which, comma-separated")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke")
    sections, smoke = args.sections.split(","), args.cpu_smoke
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    device = torch.device("cpu" if smoke else "cuda")
    report = Report(args.out, args.budget or (1e9 if args.cpu_smoke else 270))
    bench.OUT = None
    _, copy_gbs = bench.start(args.cpu_smoke, None)
    with open(os.path.join(args.out, "report.md"), "a") as fh:
        fh.write("# benchmarks/gpu.py\n\n" + "\n".join(header(device)) + "\n\n")
    run = dict(
        kernels=lambda: check_kernels(device, report),
        train=lambda: train_steps(device, report, smoke),
        memory=lambda: memory_plan(device, report, smoke),
        bench=lambda: bench_table(device, report, smoke, copy_gbs),
        blocks=lambda: blocks_table(device, report, smoke),
    )
    for name in sections:
        t0 = time.time()
        try:
            run[name]()
        except Exception as e:  # a section that breaks (out of memory, a compile error) is reported; the next runs
            import traceback

            traceback.print_exc()
            report.failed += 1
            report.section(name, "FAILED", [], [f"{type(e).__name__}: {e}"[:2000]])
            peak_reset(device)
        print(f"[{name}: {time.time() - t0:.0f} s, {time.time() - report.t0:.0f} s in all]", flush=True)
    print(f"report: {os.path.join(args.out, 'report.md')}" + (f"; {report.failed} FAILED" if report.failed else ""))
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
