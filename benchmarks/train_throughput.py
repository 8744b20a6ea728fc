"""Rollout and update throughput of the full-size SD3.5-medium training path on one GPU.

    python benchmarks/train_throughput.py [--size 512] [--batches 1,2,4,8,16,32,64]

Random weights of the full architecture (speed does not depend on the values), bf16, LoRA r=32 on the
attention projections + both preference modules, gradient checkpointing: exactly what train.py runs. For each
micro-batch B it measures
  rollout: 25 DPM-Solver-2 steps with the old policy (its adapter state swapped in once), no grad;
  update:  one NFT micro-step = old-policy forward + base forward (KL), without a graph, + policy forward and
           backward (train.py runs the first two for all micro-batches before the third: same work);
and the peak GPU memory of each; the largest B that fits is the last row without 'OOM'. One training sample
costs int(0.99 * 25) = 24 update micro-steps, so update samples/s = B / (24 * step time).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def timed(fn):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--preset", default="sd35-medium", help="sd35-tiny --device cpu: a smoke run of this script")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the README marks these numbers unmeasured where none was lent)")
    dev, dt = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    net = model.build(model.SD3Transformer, model.SD3Config(**model.SD3_PRESETS[args.preset]), device=dev, dtype=dt)
    C, Dc, Dp = net.cfg.in_channels, net.cfg.context_dim, net.cfg.pooled_dim
    h = args.size // 8
    setup = train.Setup(net, [], {}, [], [], (C, h, h), None, {})  # what the loop's helpers read: pack/unpack
    cfg = train.Config(batch=10**9, solver="dpm2")  # the update's defaults: beta 0.1, KL 1e-4, clip 5
    model.add_preference(net, 2)
    model.add_lora(net, 32, 64)
    net.grad_ckpt = True
    params = model.adapter_state(net)
    old = {n: q.detach().clone() for n, q in params.items()}
    sigmas = sample.get_schedule(args.steps, 3.0)
    T = int(0.99 * args.steps)
    print(
        f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"{args.preset} {args.size}^2 "
        f"(latent {h}x{h}, 333 text tokens), {str(dt)[6:]}, LoRA r32, grad ckpt, {args.steps} rollout steps"
    )
    print(
        f"{'B':>4s} {'rollout s':>10s} {'rollout img/s':>14s} {'peak GiB':>9s} {'update step s':>14s} "
        f"{'update img/s':>13s} {'peak GiB':>9s}"
    )
    for B in [int(b) for b in args.batches.split(",")]:
        try:
            x = torch.randn(B, C, h, h, device=dev, dtype=dt)
            ctx, pooled = torch.randn(B, 333, Dc, device=dev, dtype=dt), torch.randn(B, Dp, device=dev, dtype=dt)
            w = torch.rand(B, 2, device=dev)
            w = w / w.sum(1, keepdim=True)
            cond = dict(context=ctx, pooled=pooled)
            with torch.no_grad(), train.policy(net, old):
                tr, mr = timed(lambda: train.rollout(net, setup, x, cond, w, sigmas, cfg))

            def update():  # exactly one micro-step of train.py's update
                t, p = torch.full((B,), 0.6, device=dev), torch.full((B,), 0.7, device=dev)
                inputs = train.nft_inputs(x.float(), torch.randn_like(x.float()), t, cond, w)
                with torch.no_grad():
                    with train.policy(net, old):
                        v_old = train.velocity(net, setup, *inputs)
                    with train.policy(net, None):
                        v_ref = train.velocity(net, setup, *inputs[:3])
                loss, kl = train.update_losses(net, setup, x, *inputs, v_old, v_ref, p, cfg)
                (loss + cfg.kl_beta * kl).mean().backward()

            update()  # warm-up
            tu, mu = timed(update)
            net.zero_grad(set_to_none=True)
            print(f"{B:4d} {tr:10.2f} {B / tr:14.2f} {mr:9.1f} {tu:14.3f} {B / (T * tu):13.3f} {mu:9.1f}")
        except torch.OutOfMemoryError:
            print(f"{B:4d} OOM")
            break
        finally:
            net.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
