"""The paper's comparison on a tiny world: ParetoSlider against every baseline the paper plots, plus Rewarded Soups.

    python benchmarks/baselines.py [--seeds 0,1,2] [--steps 30] [--out runs/baselines]
    python benchmarks/baselines.py --backbone flux-kontext --methods slider,fixed,flowmulti,soups

Per seed, every run with the same budget (steps x prompts x K x G samples) on that seed's tiny base:
  slider     ParetoSlider, one model, swept over 21 w (multiples of 0.05, so it meets every FixedWeight w)
  fixed      FixedWeight at w1 in {1, .75, .5, .25, 0}, one run each (early scalarisation, no w input)
  flowmulti  FlowMulti, the summed rewards, its EMA at 1/3, 2/3 and the end of training
  prompt     prompt rewriting, the base model with ", photo" / ", mixed" / ", sketch" (text-to-image world only)
  soups      Rewarded Soups, the w = (1, 0) and (0, 1) FixedWeight runs' adapters interpolated at 11 points
Every point is scored by the training rewards and the held-out scorers (where the world has them). A run folder that
already holds eval.json is read, not re-run, so an interrupted benchmark continues where it stopped.
Prints one table (per method and point: both rewards and both held-out scores, mean +- sd over seeds; per method: the
hypervolume with a common reference point (0, 0) and Spearman(w_m, r_m), mean +- sd), then the goals of issue 11
checked on every seed, and writes summary.json and fronts.png (every method's front, training and held-out).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import train  # noqa: E402

FIXED = ["1,0", "0.75,0.25", "0.5,0.5", "0.25,0.75", "0,1"]
COLOURS = dict(
    ParetoSlider=(220, 40, 40),
    FixedWeight=(30, 90, 220),
    FlowMulti=(20, 150, 60),
    PromptRewriting=(150, 60, 190),
    RewardedSoups=(230, 140, 20),
)


def runs_of(methods, advantages=("paper",), long=()):
    """(key, run name, extra flags) in the order they must run (soups reads two FixedWeight runs). One slider run per
    variant (key "slider:<variant>"): an --advantage name, then train.py flags joined by "+" ("early+corners=0.3"
    is --advantage early --corners 0.3), each changing the paper's released 10 % corners (Config.corners, not the
    tiny preset's), and one at five times the epochs per variant in `long` (the five FixedWeight runs' budget)."""
    out, slider = [], ["--corners", str(train.Config.corners), "--eval-points", "21"]
    if "slider" in methods:
        for v, n in [(v, 1) for v in advantages] + [(v, 5) for v in long]:
            how, *more = v.split("+")
            flags = slider + ["--advantage", how] + [f for m in more for f in ("--" + m).split("=", 1)]
            out.append((f"slider:{v}" + (" 5x" if n > 1 else ""), f"slider-{v}" + ("-5x" if n > 1 else ""), flags))
    if "fixed" in methods or "soups" in methods:
        out += [("fixed", "fixed_" + w.replace(",", "_"), ["--fixed-pref", w]) for w in FIXED]
    out += [(m, m, ["--method", m]) for m in ("flowmulti", "prompt") if m in methods]
    if "soups" in methods:
        out.append(("soups", "soups", ["--method", "soups", "--eval-points", "11"]))
    return out


def title(key):  # "slider:early+corners=0.3 5x" -> "ParetoSlider (early, corners 0.3, 5x epochs)"
    method, _, variant = key.partition(":")
    variant = variant.replace(" 5x", ", 5x epochs").replace("+", ", ").replace("=", " ")
    return train.METHOD_NAMES[method] + (f" ({variant})" if variant else "")


def run(flags, folder):
    path = os.path.join(folder, "eval.json")
    if os.path.isfile(path):
        print(f"{folder}: done before, reading its eval.json")
        return model.read_json(path)
    return train.main(flags + ["--out", folder])


def fmt(vals, digits=3):  # mean +- sd over seeds (just the mean for one seed)
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.mean(vals)
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")


def goals(summary, seeds, M, heldout):
    """The goals of issue 23, per seed, for every ParetoSlider run against FixedWeight's five, printed: -> [{seed,
    run, goal, met}]. The w-weighted gap is also checked on the means over the seeds (the issue's form)."""
    checks, fw = [], summary["methods"].get("FixedWeight")
    for name, sl in summary["methods"].items():
        if not (name.startswith("ParetoSlider") and fw):
            continue
        gaps = []  # [seed][fixed point]: the slider's sum w_m r_m minus FixedWeight's at that w
        for i, s in enumerate(seeds):
            rho = [sl["spearman"][m][i] for m in range(M)]
            text = f"Spearman(w_m, r_m) >= 0.95 for every objective: {[round(r, 3) for r in rho]}"
            checks.append((s, name, text, all(r is not None and r >= 0.95 for r in rho)))
            slider_at = {tuple(round(x, 4) for x in w): v for _, w, v in sl["points"][i]}
            gaps.append([])
            for _, w, v in fw["points"][i]:
                mine = slider_at.get(tuple(round(x, 4) for x in w))
                if mine is not None:
                    gaps[-1].append(sum(a * b for a, b in zip(w, mine)) - sum(a * b for a, b in zip(w, v)))
            text = f"at each FixedWeight w, sum w_m r_m >= FixedWeight's - 0.03: gaps {[round(g, 3) for g in gaps[-1]]}"
            checks.append((s, name, text, len(gaps[-1]) == len(FIXED) and min(gaps[-1]) >= -0.03))
            for key in ("hypervolume", "heldout_hypervolume")[: 1 + bool(heldout)]:
                a, b = sl[key][i], fw[key][i]
                checks.append((s, name, f"{key}: slider {a:.4f} >= FixedWeight union {b:.4f}", a >= b))
        if len(seeds) > 1 and all(len(g) == len(FIXED) for g in gaps):
            mean = [statistics.mean(col) for col in zip(*gaps)]
            text = f"mean over seeds: sum w_m r_m >= FixedWeight's - 0.03: gaps {[round(g, 3) for g in mean]}"
            checks.append(("all", name, text, min(mean) >= -0.03))
    for s, name, text, ok in checks:
        print(f"seed {s}: {name}: {'MET    ' if ok else 'NOT MET'} {text}")
    return [dict(seed=s, run=name, goal=text, met=ok) for s, name, text, ok in checks]


SHADES = [  # ParetoSlider's own colour first, then a distinct shade per further variant
    tuple(c / 255 for c in COLOURS["ParetoSlider"]),
    (0.98, 0.6, 0.1),
    (0.55, 0.1, 0.55),
    (0.4, 0.05, 0.05),
    (0.98, 0.45, 0.65),
    (0.1, 0.1, 0.1),
    (0.1, 0.6, 0.55),
]


def colour(name, i):  # a method's colour; the i-th ParetoSlider variant in the i-th shade
    return SHADES[i % len(SHADES)] if name.startswith("ParetoSlider") else tuple(c / 255 for c in COLOURS[name])


def picture(summary, objectives, heldout, backbone, seed, out):
    """Every method's front on the first seed, training rewards and held-out scorers: out/fronts.png (and .pdf)"""
    panels = []
    for sl, pair in ((slice(0, 2), objectives[:2]), (slice(len(objectives), len(objectives) + 2), heldout[:2])):
        if len(pair) == 2:
            points = {t: [tuple(v[2][sl]) for v in m["points"][0]] for t, m in summary["methods"].items()}
            joined = [t for t in points if t.startswith(("ParetoSlider", "RewardedSoups", "FlowMulti"))]
            series = [
                dict(points=p, name=t, color=colour(t, i), join=t in joined) for i, (t, p) in enumerate(points.items())
            ]
            panels.append((pair[0], pair[1], series, None, (0, 1)))
    title = f"{backbone} tiny world, seed {seed}: every method's front" + (
        " (left: training rewards; right: held-out)" if len(panels) == 2 else ""
    )
    train.draw_panels(os.path.join(out, "fronts.png"), title, panels)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="sd35", help="sd35 (photo <-> sketch) or flux-kontext (preserve <-> adhere)")
    p.add_argument("--methods", default="slider,fixed,flowmulti,prompt,soups")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="30")
    p.add_argument("--out", default="")
    p.add_argument("--advantages", default="paper", help="ParetoSlider's --advantage variants, one run each")
    p.add_argument("--long", default="", help="variants also run at 5x the epochs (the five FixedWeight runs' total)")
    args, rest = p.parse_known_args()
    methods = args.methods.split(",")
    out = args.out or f"runs/baselines-{args.backbone}"
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    results = {}  # seed -> {method: [eval.json, ...]}
    for seed in seeds:
        common = ["--backbone", args.backbone, "--tiny", "--steps", args.steps, "--seed", str(seed), *rest]
        d = os.path.join(out, f"seed{seed}")
        res = results[seed] = {}
        for key, name, extra in runs_of(methods, args.advantages.split(","), [v for v in args.long.split(",") if v]):
            if key == "soups":
                extra = extra + ["--soup", f"{d}/fixed_1_0,{d}/fixed_0_1"]
            if key.endswith(" 5x"):
                extra = extra + ["--steps", str(5 * int(args.steps))]
            res.setdefault(key, []).append(run(common + extra, os.path.join(d, name)))
        print(f"seed {seed} done at {time.time() - t0:.0f} s")

    # --- points: per method, its labelled points (rewards, held-out) per seed
    first = results[seeds[0]]
    one = next(iter(first.values()))[0]  # any run's eval.json: every run scores the same objectives
    objectives, heldout = one["objectives"], one.get("heldout_objectives") or []
    names = objectives + heldout

    def points(seed, method):  # -> [(label, w, values over names)]
        return [
            (s["label"], s["pref"], s["rewards"] + s.get("heldout", []))
            for r in results[seed][method]
            for s in r["sweep"]
        ]

    lines = ["| method | point | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    summary = dict(seeds=seeds, objectives=objectives, heldout=heldout, methods={}, goals={})
    for method in first:
        title_ = title(method)
        per_seed = [points(s, method) for s in seeds]
        for i, (label, w, _) in enumerate(per_seed[0]):
            cols = [fmt([ps[i][2][j] for ps in per_seed]) for j in range(len(names))]
            lines.append(f"| {title_} | {label} | " + " | ".join(cols) + " |")
        hv = {
            key: [train.hypervolume([v[2][sl] for v in ps], [0.0] * len(objectives)) for ps in per_seed]
            for key, sl in (("train", slice(0, len(objectives))), ("heldout", slice(len(objectives), None)))
            if key == "train" or heldout  # the editing world has no held-out scorers
        }
        M = len(objectives)  # Spearman per objective over the method's points, then per seed: rho[m][seed]
        rho = list(
            zip(
                *[
                    train.front_stats(
                        torch.tensor([v[1] for v in ps]), torch.tensor([v[2][:M] for v in ps]), [0.0] * M
                    )[1]
                    for ps in per_seed
                ]
            )
        )
        summary["methods"][title_] = dict(
            points=per_seed, hypervolume=hv["train"], heldout_hypervolume=hv.get("heldout"), spearman=rho
        )
        lines.append(
            f"| **{title_}** | hypervolume {fmt(hv['train'], 4)}"
            + (f", held-out {fmt(hv['heldout'], 4)}" if heldout else "")
            + "; Spearman(w, r) "
            + ", ".join(fmt(r) for r in rho)
            + " |"
            + " |" * (len(names) - 1)
        )
    print("\n".join(lines))

    summary["goals"] = goals(summary, seeds, len(objectives), heldout)
    print(f"wall time {time.time() - t0:.0f} s for {len(seeds)} seed(s)")

    picture(summary, objectives, heldout, args.backbone, seeds[0], out)
    model.atomic_json(dict(summary, table=lines), os.path.join(out, "summary.json"))
    print(f"wrote {out}/summary.json and {out}/fronts.png")


if __name__ == "__main__":
    main()
