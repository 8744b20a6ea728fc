"""Where each --advantage variant pulls a group of samples, measured on a tiny base model (issue 23's diagnosis).

    python benchmarks/advantages.py [--backbone sd35] [--seed 0] [--prompts 24] [--group 6]
    python benchmarks/advantages.py --group 12 --sizes 3,6,12   # and the group size at the same budget

The tiny base of that seed (cached by train.py; pretrained here if missing) samples G images for each of P prompts,
and the training rewards score them. One NFT step moves a group's samples towards those with a high target p and
away from those with a low one, so the covariance of p and reward m inside a group, cov(p, r_m), says which way
(and how hard) the step pulls that reward; sum_m w_m cov(p, r_m) is its pull on the w-weighted reward that FixedWeight
maximises. For each w on a grid and each variant the table prints the pulls, averaged over the groups, and before it
the within-group correlation of the rewards: near -1 the per-reward z-scores are mirror images (A_2 = -A_1), so the
paper's target is 0.5 + (w_1 - w_2) A_1 / (2 clip) and its pull has the sign of w_1 - w_2, whatever the front's shape.
The base model's preference modules start at zero, so it samples the same images at every w: one set serves all.
With --sizes, the group size G at the same budget (each must divide --group): the same images split into groups of
each G, and the weighted pull's signal to noise in one epoch, mean / sd over groups x sqrt(N / G) (an epoch of the
preset holds N = prompts x K x G samples, so N / G groups): how much of an epoch's push on sum w r is direction.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards as R  # noqa: E402
import train  # noqa: E402


def pulls(r, w, groups, how, clip):
    # -> [groups, M]: cov(p, r_m) inside each group, p the variant's target at w
    p = train.preference_target(r, w, groups, how, clip)
    masks = [groups == g for g in groups.unique()]
    return torch.stack([((p[m] - p[m].mean())[:, None] * (r[m] - r[m].mean(0))).mean(0) for m in masks])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sd35")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--group", type=int, default=6)
    ap.add_argument("--sizes", default="", help="group sizes compared at the same budget, e.g. 3,6,12 (divide --group)")
    ap.add_argument("--cache", default=".cache")
    a = ap.parse_args()
    sizes = [int(g) for g in a.sizes.split(",") if g]
    if any(a.group % g for g in sizes):
        ap.error(f"--sizes {a.sizes}: each must divide --group {a.group}")
    cfg = train.Config(**{**train.preset(a.backbone, True), "backbone": a.backbone, "tiny": True, "seed": a.seed})
    cfg.cache = a.cache
    names = cfg.rewards.split(",")
    M, video = len(names), train.model.BACKBONES[a.backbone].video
    setup = train.BACKBONES[a.backbone]["tiny_setup"](cfg, M, "cpu")
    net, _ = train.adapted(cfg, setup, M, "cpu")
    gen = torch.Generator().manual_seed(a.seed)
    items = torch.randint(len(setup.prompts), (a.prompts,), generator=gen).repeat_interleave(a.group)
    noise = torch.randn(len(items), *setup.x0_shape, generator=gen)
    w_any = torch.full((len(items), M), 1 / M)
    with torch.no_grad():
        x0 = train.rollout(net, setup, noise, train.lookup(setup, items, "cpu"), w_any, train.schedule(cfg, setup), cfg)
    fns = [R.get_reward(n, video=video) for n in names]
    r, _ = train.score(fns, names, x0, setup, items.tolist(), cfg.batch, "diagnosis")
    groups = torch.arange(len(items)) // a.group
    corr = [torch.corrcoef(r[groups == g].T)[0, 1].item() for g in groups.unique()]
    print(f"{a.backbone} tiny base, seed {a.seed}: {a.prompts} prompts x {a.group} samples; rewards {names}")
    print(f"within-group correlation of the two rewards: mean {sum(corr) / len(corr):.3f}, max {max(corr):.3f}")
    print("pull of one step on each reward and on sum_m w_m r_m (x 1000): cov(p, r) inside a group, mean over groups")
    hows = train.CHOICES["advantage"]
    print("| w1 | " + " | ".join(f"{h}: {names[0]}, {names[1]}, weighted" for h in hows) + " |")
    print("|---" * (1 + len(hows)) + "|")
    for i in range(11):
        w = torch.tensor([1 - i / 10, i / 10]).expand(len(items), 2)
        cols = []
        for how in hows:
            c = pulls(r, w, groups, how, cfg.adv_clip).mean(0) * 1000
            cols.append(f"{c[0]:+.2f}, {c[1]:+.2f}, {(c * w[0]).sum():+.2f}")
        print(f"| {1 - i / 10:.1f} | " + " | ".join(cols) + " |")
    if not sizes:
        return
    N = cfg.prompts_per_step * cfg.prefs_per_prompt * cfg.group_size
    print(f"\ngroup size G at the same budget ({N} samples an epoch): epoch signal to noise, pull on sum w r")
    print("| w1 | " + " | ".join(f"{h}: " + ", ".join(f"G={g}" for g in sizes) for h in hows) + " |")
    print("|---" * (1 + len(hows)) + "|")
    for w1 in (1.0, 0.75, 0.5, 0.25, 0.0):
        w = torch.tensor([w1, 1 - w1]).expand(len(items), 2)
        cols = []
        for how in hows:
            snr = []
            for g in sizes:
                c = (pulls(r, w, torch.arange(len(items)) // g, how, cfg.adv_clip) * w[0]).sum(1)
                snr.append(c.mean() / c.std() * (N / g) ** 0.5)
            cols.append(", ".join(f"{v:.1f}" for v in snr))
        print(f"| {w1:.2f} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
