"""Our SD3.5 forward vs diffusers' SD3Transformer2DModel on the same weights, side by side in one run.

    python benchmarks/forward_vs_diffusers.py                 # CPU fp32, mid-size MMDiT-X (8 blocks, D=512,
                                                              # 64x64 latent)
    python benchmarks/forward_vs_diffusers.py --device cuda   # + bf16 sd35-medium at 1024^2 with peak memory

diffusers is a dev requirement (the oracle); this script is not a test. Timings alternate between the two
models (and which goes first) so that machine noise and cache warmth hit both alike; the table gives medians and
the ratio ours / diffusers.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model  # noqa: E402

MID = dict(
    sample_size=64,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=8,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=4096,
    caption_projection_dim=512,
    pooled_projection_dim=2048,
    pos_embed_max_size=96,
    qk_norm="rms_norm",
    dual_attention_layers=(0, 1, 2, 3),
)
MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)


def pair(cfg, device, dtype):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        ref = SD3Transformer2DModel(**cfg).to(dtype).eval()
    ours = model.build(
        model.SD3Transformer,
        model.sd3_config_from_diffusers(cfg),
        model.sd3_from_diffusers(ref.state_dict(), cfg["num_layers"]),
        dtype=dtype,
        device=device,
    ).eval()
    return ref, ours


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bench(cfg, latent, batch, device, dtype, iters):
    ref, ours = pair(cfg, device, dtype)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, 16, latent, latent, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(batch, 333, 4096, device=device, dtype=dtype, generator=g)
    pooled = torch.randn(batch, 2048, device=device, dtype=dtype, generator=g)
    sigma = torch.full((batch,), 0.7, device=device)
    run_ref = lambda: (
        ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * sigma).sample
    )
    run_ours = lambda: ours(x, sigma, ctx, pooled)
    a, b = run_ours(), run_ref()  # warm-up, and a correctness check on the same weights
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    times, peaks = {"ours": [], "diffusers": []}, {}
    for i in range(iters):  # alternate which runs first, so neither always finds the caches warmed by the other
        for name, fn in (("ours", run_ours), ("diffusers", run_ref))[:: 1 if i % 2 else -1]:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if device == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, peaks, err


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    rows = [("mid MMDiT-X 8x512, 64x64 latent, B=2", MID, 64, 2, "cpu", torch.float32)]
    if args.device == "cuda":
        rows.append(("sd35-medium 1024^2, B=1", MEDIUM, 128, 1, "cuda", torch.bfloat16))
    print(
        f"torch {torch.__version__}, kernels backend {kernels.get_backend()}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}"
    )
    print(
        f"{'setting':40s} {'dtype':9s} {'ours ms':>9s} {'diffusers ms':>13s} {'ratio':>6s} {'rel err':>8s} "
        f"{'peak GiB ours/diff':>19s}"
    )
    for name, cfg, latent, batch, device, dtype in rows:
        med, peaks, err = bench(cfg, latent, batch, device, dtype, args.iters)
        peak = f"{peaks['ours']:.2f}/{peaks['diffusers']:.2f}" if peaks else "-"
        print(
            f"{name:40s} {str(dtype)[6:]:9s} {1e3 * med['ours']:9.1f} {1e3 * med['diffusers']:13.1f} "
            f"{med['ours'] / med['diffusers']:6.3f} {err:8.1e} {peak:>19s}"
        )


if __name__ == "__main__":
    main()
