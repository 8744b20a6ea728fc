"""The paper's central claim on the tiny world: one ParetoSlider model vs five FixedWeight runs.

    python benchmarks/slider_vs_fixed.py [--backbone sd35 | flux-kontext] [--steps 30] [--out runs/bench]

ParetoSlider once, and FixedWeight (early scalarization, no preference input) at w1 in {1, .75, .5, .25, 0},
each with the same per-run budget (steps x prompts x K x G samples). Hypervolumes share one reference point;
the FixedWeight front is the union of the five runs' points. Spearman: w_m against reward m over the
slider's sweep. Prints a markdown table (the README carries it).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FIXED = ["1,0", "0.75,0.25", "0.5,0.5", "0.25,0.75", "0,1"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="sd35", help="sd35 (photo <-> sketch) or flux-kontext (preserve <-> adhere)")
    p.add_argument("--steps", default="30")
    p.add_argument("--out", default="")
    p.add_argument("--ref-point", default="0,0")
    args, rest = p.parse_known_args()
    args.out = args.out or f"runs/bench-{args.backbone}"
    common = ["--backbone", args.backbone, "--tiny", "--steps", args.steps, "--ref-point", args.ref_point, *rest]
    runs = {}
    t0 = time.time()
    runs["ParetoSlider"] = train.main(common + ["--out", f"{args.out}/slider"])
    for w in FIXED:
        runs[f"FixedWeight {w}"] = train.main(common + ["--out", f"{args.out}/fixed_{w.replace(',', '_')}",
                                                        "--fixed-pref", w])
    ref = [float(v) for v in args.ref_point.split(",")]
    slider = runs.pop("ParetoSlider")
    fixed_pts = [r["sweep"][0]["rewards"] for r in runs.values()]
    hv_slider, hv_fixed = train.hypervolume([s["rewards"] for s in slider["sweep"]], ref), train.hypervolume(fixed_pts, ref)
    names = slider["objectives"]
    lines = [f"| run | w | {names[0]} | {names[1]} | hypervolume |", "|---|---|---|---|---|"]
    for i, s in enumerate(slider["sweep"]):
        hv = f"{hv_slider:.4f} (whole sweep)" if i == len(slider["sweep"]) - 1 else ""
        lines.append(f"| ParetoSlider (one model) | {s['pref'][0]:.2f}, {s['pref'][1]:.2f} | {s['rewards'][0]:.3f} | "
                     f"{s['rewards'][1]:.3f} | {hv} |")
    for name, r in runs.items():
        s = r["sweep"][0]
        lines.append(f"| FixedWeight (own run) | {s['pref'][0]:.2f}, {s['pref'][1]:.2f} | {s['rewards'][0]:.3f} | "
                     f"{s['rewards'][1]:.3f} | {r['hypervolume']:.4f} |")
    lines.append(f"| FixedWeight union of 5 runs | | | | {hv_fixed:.4f} |")
    print("\n".join(lines))
    print(f"\nhypervolume (ref {ref}): ParetoSlider {hv_slider:.4f} vs FixedWeight union {hv_fixed:.4f} "
          f"(ratio {hv_slider / max(hv_fixed, 1e-12):.3f})")
    print(f"Spearman(w_m, reward m) over the sweep: {[round(v, 3) for v in slider['spearman']]}")
    print(f"wall time {time.time() - t0:.0f} s for 6 runs")
    train.model.atomic_json(dict(hv_slider=hv_slider, hv_fixed_union=hv_fixed, spearman=slider["spearman"],
                                 ref_point=ref, table=lines), os.path.join(args.out, "summary.json"))


if __name__ == "__main__":
    main()
