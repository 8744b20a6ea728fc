"""train.py: the method's math against hand computations and closed forms, the tiny run end to end,
exact resume, and clear errors on bad input."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import model
import train
from tiny_repos import sd35_repo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nft_loss_hand_computation():
    beta, clip = 0.1, 5.0
    g = torch.Generator().manual_seed(0)
    v, v_old, x0, eps = (torch.randn(2, 1, 2, 2, generator=g) for _ in range(4))
    t, p = torch.tensor([0.3, 0.8]), torch.tensor([0.9, 0.2])
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    got = train.nft_loss(v, v_old, x0, xt, t, p, beta, clip)
    for i in range(2):  # the NFT loss written out element by element
        vn, vo, x, xti, ti = (
            v[i].flatten().tolist(),
            v_old[i].flatten().tolist(),
            x0[i].flatten().tolist(),
            xt[i].flatten().tolist(),
            t[i].item(),
        )
        vp = [beta * a + (1 - beta) * b for a, b in zip(vn, vo)]
        vm = [(1 + beta) * b - beta * a for a, b in zip(vn, vo)]

        def loss_of(vv):
            err = [xi - ti * vvi - x0i for xi, vvi, x0i in zip(xti, vv, x)]
            w = max(sum(abs(e) for e in err) / 4, 1e-5)
            return sum(e * e for e in err) / 4 / w

        want = clip * (p[i].item() * loss_of(vp) / beta + (1 - p[i].item()) * loss_of(vm) / beta)
        assert got[i].item() == pytest.approx(want, rel=1e-5)


def test_mixing_optimality_equals_weighted_per_reward_losses():
    g = torch.Generator().manual_seed(1)
    v, v_old, x0, xt = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(4))
    t = torch.rand(4, generator=g)
    w = train.sample_preferences(4, 3, g)
    p_m = train.optimality(torch.randn(4, 3, generator=g) * 4)
    weighted = sum(w[:, m] * train.nft_loss(v, v_old, x0, xt, t, p_m[:, m], 0.1) for m in range(3))
    mixed = train.nft_loss(v, v_old, x0, xt, t, (w * p_m).sum(1), 0.1)
    assert torch.allclose(weighted, mixed, rtol=1e-5)


def test_optimality_clips():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 7.0])
    assert train.optimality(a).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]


def test_group_advantages_against_numpy():
    g = torch.Generator().manual_seed(2)
    r = torch.rand(12, 2, generator=g) * torch.tensor([1.0, 100.0])  # very different reward scales
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    a = train.group_advantages(r, groups)
    rn = r.numpy()
    for k in range(3):
        m = (groups == k).numpy()
        want = (rn[m] - rn[m].mean(0)) / (rn[m].std(0) + 1e-4)
        np.testing.assert_allclose(a[m].numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[m].numpy().mean(0), 0, atol=1e-5)  # each reward normalised separately


def test_advantage_variants_are_what_they_say():
    # --advantage: the three ways ParetoSlider turns M rewards and a sample's own w into its target p
    g = torch.Generator().manual_seed(5)
    groups = torch.arange(24) // 6  # four (prompt, w) groups of six
    w = train.sample_preferences(4, 2, g)[groups]
    r = torch.rand(24, 2, generator=g) * torch.tensor([1.0, 3.0])
    r[6:12] *= 0.1  # one group whose rewards barely vary
    for k in range(4):
        m = groups == k
        s = (r[m] * w[m]).sum(1)
        # early: FixedWeight's advantage at the group's w, computed by hand (sum_m w_m r_m, z-scored, optimality)
        want = 0.5 + 0.5 * ((s - s.mean()) / (s.std(unbiased=False) + 1e-4) / 5).clamp(-1, 1)
        torch.testing.assert_close(train.preference_target(r, w, groups, "early")[m], want)
        # paper: each reward z-scored in the group, then sum_m w_m opt(A_m)
        z = (r[m] - r[m].mean(0)) / (r[m].std(0, unbiased=False) + 1e-4)
        paper = (w[m] * (0.5 + 0.5 * (z / 5).clamp(-1, 1))).sum(1)
        torch.testing.assert_close(train.preference_target(r, w, groups, "paper")[m], paper)
    # FixedWeight's path in train() is early at its one w, per prompt: the same function, the same numbers
    fixed = torch.tensor([0.3, 0.7]).expand(24, 2)
    s = (r * fixed).sum(1)
    want = 0.5 + 0.5 * ((s - s[:12].mean()) / (s[:12].std(unbiased=False) + 1e-4) / 5).clamp(-1, 1)
    torch.testing.assert_close(train.preference_target(r, fixed, groups // 2, "early")[:12], want[:12])
    # spread: centred per group, scaled per reward by the batch's pooled within-group spread s_m, so inside a group
    # p ranks samples as sum_m w_m r_m / s_m does, a quiet group keeps its small advantages (the z-score blows them
    # up to unit spread), and scaling one reward changes nothing
    spread = train.preference_target(r, w, groups, "spread", clip=100.0)
    c = r - torch.stack([r[groups == k].mean(0) for k in range(4)])[groups]
    scaled = (w * r / c.square().mean(0).sqrt()).sum(1)
    for k in range(4):
        m = groups == k
        assert torch.equal(spread[m].argsort(), scaled[m].argsort())
    quiet, loud = ((spread[groups == k] - 0.5).abs().mean() for k in (1, 0))
    assert quiet < 0.2 * loud
    torch.testing.assert_close(
        train.preference_target(r * torch.tensor([7.0, 1.0]), w, groups, "spread", 100.0), spread
    )
    # on a one-dimensional trade-off (r2 = -r1 inside a group) the paper's push has the sign of w1 - w2 for every w;
    # early and spread follow the weighted sum of the rewards' own slopes (here r1 moves twice as fast as -r2)
    t = torch.linspace(-1, 1, 6)
    r1 = torch.stack([2 * t, -t], 1)  # sample i: photo +2t, sketch -t
    w1 = torch.tensor([0.4, 0.6]).expand(6, 2)  # w1 < w2, yet 0.4 * 2 > 0.6 * 1: the weighted sum rises with t
    one = torch.zeros(6, dtype=torch.long)
    assert train.preference_target(r1, w1, one, "paper").diff().lt(0).all()  # pushed towards the sketch end
    assert train.preference_target(r1, w1, one, "early").diff().gt(0).all()
    assert train.preference_target(r1 / r1.std(0), w1, one, "spread").diff().lt(0).all()  # equal spreads: as paper


def test_preference_sampling_statistics():
    g = torch.Generator().manual_seed(3)
    w = train.sample_preferences(40000, 2, g)
    assert torch.allclose(w.sum(1), torch.ones(len(w))) and (w >= 0).all()
    corner = (w.max(1).values == 1).float().mean().item()
    assert abs(corner - 0.10) < 0.01
    inner = w[w.max(1).values < 1][:, 0]  # Dirichlet(1,1): w1 uniform on [0,1]
    assert abs(inner.mean().item() - 0.5) < 0.01 and abs(inner.var().item() - 1 / 12) < 0.003
    w = train.sample_preferences(40000, 2, g, corners=0.3)  # --corners: the share of one-hot w
    assert abs((w.max(1).values == 1).float().mean().item() - 0.3) < 0.01
    w3 = train.sample_preferences(40000, 3, g)
    assert torch.allclose(w3.sum(1), torch.ones(len(w3)), atol=1e-6) and (w3 >= 0).all()
    zeros = (w3 == 0).sum(1)
    frac = [(zeros == k).float().mean().item() for k in (2, 1, 0)]  # vertex, edge, interior
    assert abs(frac[0] - 0.50) < 0.015 and abs(frac[1] - 0.35) < 0.015 and abs(frac[2] - 0.15) < 0.015
    assert (w3[zeros == 2].argmax(1).bincount(minlength=3).float() / (zeros == 2).sum() - 1 / 3).abs().max() < 0.02


def test_hypervolume_closed_forms():
    hv = train.hypervolume
    assert hv([[2.0, 3.0]], [0, 0]) == pytest.approx(6.0)
    assert hv([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]], [0, 0]) == pytest.approx(3 + 2 + 1)  # staircase
    assert hv([[1.0, 3.0], [0.5, 1.0]], [0, 0]) == pytest.approx(3.0)  # dominated point adds nothing
    assert hv([[1.0, 3.0], [-1.0, 5.0]], [0, 0]) == pytest.approx(3.0)  # not better than ref: ignored
    assert hv([[2.0, 3.0]], [1.0, 1.0]) == pytest.approx(2.0)
    a, b = np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])  # 3-D inclusion-exclusion
    want = a.prod() + b.prod() - np.minimum(a, b).prod()
    assert hv([a.tolist(), b.tolist()], [0, 0, 0]) == pytest.approx(want)
    rng = np.random.default_rng(0)  # Monte-Carlo cross-check in 3-D
    pts = rng.random((6, 3))
    u = rng.random((200000, 3))
    mc = np.any(np.all(u[:, None, :] <= pts[None], axis=2), axis=1).mean()
    assert hv(pts.tolist(), [0, 0, 0]) == pytest.approx(mc, abs=0.005)


def test_pref_grid():
    g2 = train.pref_grid(2, 11)
    assert len(g2) == 11 and g2[0] == [1.0, 0.0] and g2[-1] == [0.0, 1.0]
    g3 = train.pref_grid(3, 11)
    assert len(g3) == 21 and all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in g3)
    assert len({tuple(w) for w in g3}) == 21


TINY = [
    "--backbone",
    "sd35",
    "--tiny",
    "--pretrain-steps",
    "3",
    "--pretrain-batch",
    "8",
    "--prompts-per-step",
    "2",
    "--prefs-per-prompt",
    "2",
    "--group-size",
    "2",
    "--sample-steps",
    "2",
    "--eval-points",
    "3",
    "--eval-prompts",
    "2",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--batch",
    "4",
]


def run(tmp_path, *extra, name="run"):
    return train.main(TINY + ["--out", str(tmp_path / name), "--cache", str(tmp_path / "cache"), *extra])


def test_tiny_run_end_to_end(tmp_path):
    res = run(tmp_path, "--steps", "2")
    out = tmp_path / "run"
    for f in (
        "eval.json",
        "pareto.png",
        "slider.png",
        "config.json",
        "log.txt",
        "checkpoint.safetensors",
        "adapters.safetensors",
    ):
        assert (out / f).is_file(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objectives"] == ["tiny_photo", "tiny_sketch"] and len(ev["sweep"]) == 3
    assert ev["sweep"][0]["pref"] == [1.0, 0.0] and len(ev["sweep"][1]["rewards"]) == 2
    assert ev["hypervolume"] == pytest.approx(train.hypervolume([s["rewards"] for s in ev["sweep"]], ev["ref_point"]))
    assert res["hypervolume"] == ev["hypervolume"]
    log = (out / "log.txt").read_text()
    assert '"git"' in log and "step 2/2" in log and "hypervolume" in log
    pdf = (out / "pareto.pdf").read_bytes()  # the front as a vector file for papers, made by matplotlib
    assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-32:] and b"Matplotlib" in pdf
    # M = 3 and the FixedWeight baseline run through the same loop
    ev3 = run(tmp_path, "--steps", "1", "--rewards", "tiny_photo,tiny_sketch,tiny_prompt", name="m3")
    assert len(ev3["sweep"]) == len(train.pref_grid(3, 3)) == 6 and len(ev3["ref_point"]) == 3
    fw = run(tmp_path, "--steps", "1", "--fixed-pref", "0.25,0.75", name="fixed")
    assert fw["method"] == "FixedWeight" and [s["pref"] for s in fw["sweep"]] == [[0.25, 0.75]]


def test_baselines_are_what_they_say(tmp_path):
    # FlowMulti: an unconditioned model (no preference modules) trained on the summed rewards, evaluated at its three
    # checkpoints; group normalisation is scale-free, so its update is exactly FixedWeight's at the uniform w
    fm = run(tmp_path, "--steps", "3", "--method", "flowmulti", name="flowmulti")
    assert fm["method"] == "FlowMulti" and [s["label"] for s in fm["sweep"]] == ["step 1", "step 2", "step 3"]
    d = tmp_path / "flowmulti"
    ada = load_file(d / "adapters.safetensors")
    assert ada and not any(k.startswith("pref_") for k in ada)
    assert json.loads(model.read_safetensors_meta(str(d / "adapters.safetensors"))["config"])["pref_dim"] == 0
    last = load_file(d / "adapters_step3.safetensors")
    assert all(torch.equal(last[k], ada[k]) for k in ada)  # the last checkpoint is the final EMA
    assert any((load_file(d / "adapters_step1.safetensors")[k] != ada[k]).any() for k in ada)
    fw = run(tmp_path, "--steps", "3", "--fixed-pref", "0.5,0.5", name="fixed_half")
    half = load_file(tmp_path / "fixed_half" / "adapters.safetensors")
    assert ada.keys() == half.keys() and all(torch.equal(ada[k], half[k]) for k in ada)
    assert fm["sweep"][-1]["rewards"] == fw["sweep"][0]["rewards"]
    # Rewarded Soups: the two single-reward runs' adapters mixed tensor by tensor; its ends are those runs exactly
    a = run(tmp_path, "--steps", "2", "--fixed-pref", "1,0", name="photo")
    b = run(tmp_path, "--steps", "2", "--fixed-pref", "0,1", name="sketch")
    rs = run(tmp_path, "--method", "soups", "--soup", f"{tmp_path / 'photo'},{tmp_path / 'sketch'}", name="soups")
    assert rs["method"] == "RewardedSoups" and [s["pref"] for s in rs["sweep"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert (
        rs["sweep"][0]["rewards"] == a["sweep"][0]["rewards"] and rs["sweep"][-1]["rewards"] == b["sweep"][0]["rewards"]
    )
    assert rs["sweep"][0]["heldout"] == a["sweep"][0]["heldout"]
    assert not (tmp_path / "soups" / "checkpoint.safetensors").exists()  # nothing trained
    sa, sb = (
        load_file(tmp_path / "photo" / "adapters.safetensors"),
        load_file(tmp_path / "sketch" / "adapters.safetensors"),
    )
    mix = train.soup(sa, sb, 0.25)
    assert mix.keys() == sa.keys() and all(torch.equal(mix[k], 0.25 * sa[k] + 0.75 * sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    # prompt rewriting: no training; the base model prompted with the style words of its captions
    pr = run(tmp_path, "--method", "prompt", name="prompt")
    assert [s["label"] for s in pr["sweep"]] == ["prompt ', photo'", "prompt ', mixed'", "prompt ', sketch'"]
    assert [s["pref"] for s in pr["sweep"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert pr["sweep"][0]["rewards"] != pr["sweep"][2]["rewards"]  # the words reach the network
    assert not (tmp_path / "prompt" / "adapters.safetensors").exists()
    # the held-out scorers are in every eval.json, with their own front
    for r in (fm, rs, pr):
        assert r["heldout_objectives"] == ["tiny_photo_heldout", "tiny_sketch_heldout"]
        assert all(len(s["heldout"]) == 2 for s in r["sweep"]) and len(r["base"]["heldout"]) == 2
        assert r["heldout_hypervolume"] == pytest.approx(train.hypervolume([s["heldout"] for s in r["sweep"]], [0, 0]))
    assert fm["spearman"] == [None, None] and pr["spearman"][0] is not None  # constant w: no rank correlation


def test_tiny_captions_carry_style_words(tmp_path):
    # about half of the pretraining captions name the image's style; the rewrites are those captions' encodings
    cfg = train.parse_config(TINY + ["--out", str(tmp_path / "x"), "--cache", str(tmp_path / "cache")])
    setup = train.sd35_tiny_setup(cfg, 2, "cpu")
    assert list(setup.rewrites) == [", photo", ", mixed", ", sketch"]
    for w, c in setup.rewrites.values():
        assert c["context"].shape == setup.cond["context"].shape and not torch.equal(
            c["context"], setup.cond["context"]
        )
    assert not torch.equal(setup.rewrites[", photo"][1]["pooled"], setup.rewrites[", sketch"][1]["pooled"])


def test_sample_run_matches_slider_png(tmp_path):
    # sample.py --run rebuilds a finished tiny run (cached base, tiny text encoders, EMA adapter, the run's steps /
    # solver / shift / size) and draws the same picture as the run's slider.png for the same prompt, noise and w
    from PIL import Image

    import sample

    res = run(tmp_path, "--steps", "2")
    d = tmp_path / "run"
    prompt = res["eval_prompts"][0]
    sample.main(
        ["--run", str(d), "--prompt", prompt, "--pref", "1,0", "--seed", "1234", "--out", str(tmp_path / "a.png")]
    )
    ours = torch.tensor(list(Image.open(tmp_path / "a.png").get_flattened_data()), dtype=torch.float32)
    grid = Image.open(d / "slider.png").convert("RGB")  # rows: eval prompts, columns: w; tiles 96 px = 3 x 32 px
    rows, cols = min(6, len(res["eval_prompts"])), len(res["sweep"])
    assert res["sweep"][0]["pref"] == [1.0, 0.0]
    x0, y0 = grid.width - cols * 96, grid.height - rows * 96  # tile (row 0, column 0); labels sit left and above
    tile = grid.crop((x0, y0, x0 + 96, y0 + 96)).resize((32, 32), Image.NEAREST)
    theirs = torch.tensor(list(tile.get_flattened_data()), dtype=torch.float32)
    assert ours.shape == theirs.shape and theirs.std() > 5
    assert (ours - theirs).abs().max() <= 1  # equal up to 8-bit rounding (batch of 2 in the run vs 1 here)
    sample.main(
        ["--run", str(d), "--prompt", prompt, "--sweep", "3", "--seed", "1234", "--out", str(tmp_path / "s.png")]
    )
    assert Image.open(tmp_path / "s.png").width == 3 * 160
    # the adapter knows its objective count and backbone: a wrong one is refused with both named
    with pytest.raises(SystemExit) as e:
        sample.main(["--run", str(d), "--prompt", prompt, "--pref", "0.2,0.3,0.5", "--out", str(tmp_path / "b.png")])
    assert e.value.code == 2


def test_resume_equals_straight(tmp_path):
    run(tmp_path, "--steps", "2", name="a")
    train.main(["--resume", str(tmp_path / "a"), "--steps", "4"])
    run(tmp_path, "--steps", "4", name="b")
    a, b = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
        else:
            assert torch.equal(a[k], b[k]), k
    first = load_file(tmp_path / "a" / "adapters.safetensors")
    assert all(torch.equal(first[k], a[f"ema.{k}"]) for k in first)  # the saved adapters are the final EMA


def test_cosine_lr_schedule_scales_each_step_and_cannot_be_stretched(tmp_path, capsys):
    # the first step is shared (factor cosine(0, 2) = 1), so the second step's update, weight decay included, is the
    # constant run's times cosine(1, 2) = 0.5: same rollouts, same gradient, half the lr
    assert train.cosine(0, 2) == 1.0 and abs(train.cosine(1, 2) - 0.5) < 1e-12 and train.cosine(0, 10, warm=4) == 0.25
    policy = lambda name: {
        k: v for k, v in load_file(tmp_path / name / "checkpoint.safetensors").items() if k.startswith("policy.")
    }
    for name, extra in (("one", ["--steps", "1"]), ("const", ["--steps", "2"])):
        run(tmp_path, *extra, name=name)
    run(tmp_path, "--steps", "2", "--lr-schedule", "cosine", name="cos")
    p1, const, cos = policy("one"), policy("const"), policy("cos")
    moved = sum((const[k] - p1[k]).abs().sum().item() for k in p1)
    assert moved > 0
    assert sum((cos[k] - p1[k] - 0.5 * (const[k] - p1[k])).abs().sum().item() for k in p1) < 1e-3 * moved
    with pytest.raises(SystemExit) as e:  # extending the run would raise its lr again
        train.main(["--resume", str(tmp_path / "cos"), "--steps", "4"])
    assert e.value.code == 2 and "its cosine lr decays to 0 over the run's 2 steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--fixed-pref", "0.5,0.3,0.2"], "has 3 weights but there are 2 objectives"),
        (["--fixed-pref", "0.7,0.7"], "not on the simplex"),
        (["--rewards", "tiny_photo,nope"], "unknown reward"),
        (["--rewards", "tiny_photo"], "at least two objectives"),
        (["--method", "fixed"], "needs its weights: --fixed-pref"),
        (["--method", "flowmulti", "--fixed-pref", "0.5,0.5"], "--method flowmulti takes none"),
        (["--method", "soups"], "needs --soup runA,runB"),
        (["--soup", "a,b"], "--soup is for --method soups only"),
        (
            ["--method", "soups", "--soup", "nowhere,nothere"],
            "each with adapters.safetensors (none in nowhere, nothere)",
        ),
        (["--method", "prompt", "--rewards", "tiny_photo,tiny_sketch,tiny_prompt"], "along two objectives"),
        (["--method", "dpo"], "--method 'dpo': choose one of"),
        (["--heldout", "tiny_nope"], "unknown reward"),
        (["--heldout", "temporal_flicker"], "score videos; --backbone sd35 makes images"),
        (["--fixed-pref", "0.5,0.5", "--advantage", "spread"], "--advantage: only ParetoSlider mixes advantages"),
        (["--advantage", "mean"], "--advantage 'mean': choose one of"),
        (
            ["--corners", "0.3", "--rewards", "tiny_photo,tiny_sketch,tiny_prompt"],
            "--corners: it shapes",
        ),
        (["--corners", "1.5"], "--corners 1.5: must be >= 0.0 and <= 1.0"),
    ],
)
def test_bad_input_clear_errors(tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "1", *args)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--tiny", "--size", "18"], "--size 18: the tiny ltx2 needs a multiple of 4"),
        (["--frames", "10"], "ltx2 needs 8k+1 frames"),
        (["--size", "500"], "--size 500: ltx2 needs a multiple of 32"),
        (["--no-vae"], "missing vae/ (a single file: sample.py reads it)"),
    ],
)
def test_ltx2_clip_size_refused_before_loading(tmp_path, capsys, args, msg):
    # the full-size weights here are a folder of empty parts: the clip is refused before anything would load
    (tmp_path / "p.txt").write_text("a red circle\n")
    for d in ("text_encoder", "tokenizer") + (() if "--no-vae" in args else ("vae",)):
        (tmp_path / d).mkdir()
    args = [a for a in args if a != "--no-vae"]
    full = (
        []
        if "--tiny" in args
        else ["--weights", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--device", "cpu"]
    )
    with pytest.raises(SystemExit) as e:
        train.main(["--backbone", "ltx2", *full, *args, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_missing_weights_is_a_message_not_a_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "train.py", "--backbone", "sd35", "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no base weights" in p.stderr and "--tiny" in p.stderr


def test_full_size_path_on_a_tiny_diffusers_folder(tmp_path):
    # the --weights path end to end (load_transformer, load_vae, load_text_encoders, latent rollouts decoded by
    # the VAE), on a CPU with a tiny random SD3.5 folder standing in for the released weights
    repo = tmp_path / "repo"
    sd35_repo(repo)
    res = train.main(
        [
            "--backbone",
            "sd35",
            "--weights",
            str(repo),
            "--prompts",
            str(repo / "prompts.txt"),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--rewards",
            "tiny_photo,tiny_sketch",
            "--size",
            "32",
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--prefs-per-prompt",
            "2",
            "--group-size",
            "2",
            "--sample-steps",
            "2",
            "--eval-points",
            "3",
            "--eval-prompts",
            "2",
            "--lora-rank",
            "2",
            "--batch",
            "4",
            "--grad-ckpt",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert len(res["sweep"]) == 3 and res["eval_prompts"] == ["a red circle", "a blue square"]
    assert (tmp_path / "run" / "slider.png").is_file()
    with pytest.raises(SystemExit):
        train.main(["--backbone", "sd35", "--weights", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])


def test_flux_kontext_tiny_run_and_sample_run(tmp_path):
    # the editing backbone through the same loop: source images as Kontext reference tokens and as the rewards'
    # meta["source"]; sample.py --run rebuilds it and puts the source first in the strip
    from PIL import Image

    import sample

    res = train.main(
        [
            "--backbone",
            "flux-kontext",
            "--tiny",
            *TINY[3:],
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert res["objectives"] == ["tiny_preserve", "tiny_adhere"] and len(res["sweep"]) == 3
    assert all(torch.isfinite(torch.tensor(s["rewards"])).all() for s in res["sweep"])
    grid = Image.open(tmp_path / "run" / "slider.png")
    assert grid.width >= 4 * 96  # source + 3 values of w
    src = tmp_path / "src.png"
    sample.to_pil(torch.rand(3, 32, 32)).save(src)
    out = tmp_path / "strip.png"
    sample.main(
        [
            "--run",
            str(tmp_path / "run"),
            "--image",
            str(src),
            "--prompt",
            "make it blue",
            "--sweep",
            "3",
            "--out",
            str(out),
        ]
    )
    strip = Image.open(out)
    assert strip.width == 4 * 160  # 32 px tiles enlarged 5x: the source, then 3 values of w
    band = strip.height - 160
    first = torch.tensor(
        list(strip.crop((0, band, 160, band + 160)).resize((32, 32), Image.NEAREST).get_flattened_data())
    )
    assert (first.float() - torch.tensor(list(Image.open(src).get_flattened_data())).float()).abs().max() <= 1


def test_edit_set_errors(tmp_path, capsys):
    bad = tmp_path / "edits.jsonl"
    bad.write_text('{"image": "a.png", "prompt": "make it blue"}\n{"prompt": "no image here"}\n')
    with pytest.raises(train.RunError, match=r"edits.jsonl:2: expected \{\"image\": path, \"prompt\": text\}"):
        train.read_edits(str(bad))
    bad.write_text('{"image": "missing.png", "prompt": "make it blue"}\n')
    with pytest.raises(train.RunError, match="1 image\\(s\\) not found"):
        train.read_edits(str(bad))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.png").write_bytes(b"")
    with pytest.raises(train.RunError, match="x.png has no instruction file x.txt"):
        train.read_edits(str(tmp_path / "f"))
    with pytest.raises(SystemExit) as e:
        train.main(
            ["--backbone", "flux-kontext", "--weights", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "o")]
        )
    assert e.value.code == 2 and "--edits ''" in capsys.readouterr().err


def test_baselines_benchmark_runs(tmp_path, monkeypatch, capsys):
    # benchmarks/baselines.py end to end on the tiny flags: every method, the table, the goals, the picture; a
    # second call reads the finished runs instead of training again
    import runpy

    flags = [a for a in TINY if a not in ("--backbone", "sd35", "--tiny")]
    argv = [
        "baselines.py",
        "--seeds",
        "0",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "b"),
        "--advantages",
        "paper,early",
        "--cache",
        str(tmp_path / "cache"),
        *flags,
    ]
    for _ in range(2):
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(os.path.join(ROOT, "benchmarks", "baselines.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("done before, reading its eval.json") == 10  # 2 + 5 + 1 + 1 + 1 runs, read back
    for name in ("ParetoSlider (paper)", "ParetoSlider (early)", "FixedWeight", "FlowMulti", "RewardedSoups"):
        assert f"| **{name}** | hypervolume" in out
    assert out.count("seed 0: ") == 2 * 2 * 4  # twice, per slider run: Spearman, the w-weighted reward, both HVs
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    m = summary["methods"]
    assert len(m["ParetoSlider (early)"]["points"][0]) == 21 and len(m["RewardedSoups"]["points"][0]) == 11
    assert m["RewardedSoups"]["points"][0][0][2] == m["FixedWeight"]["points"][0][0][2]  # lam = 1 is the w=(1,0) run
    assert (tmp_path / "b" / "fronts.png").stat().st_size > 1000
    # a variant changes the paper's slider, not the tiny preset's: "paper" and "early" draw the released 10 % corners
    for run_ in ("slider-paper", "slider-early"):
        assert json.loads((tmp_path / "b" / "seed0" / run_ / "config.json").read_text())["corners"] == 0.1
    # the editing world has no held-out scorers: the table, the goals and the summary go without them
    argv[argv.index("--out") + 1] = str(tmp_path / "e")
    argv += ["--backbone", "flux-kontext", "--methods", "slider,fixed", "--advantages", "paper"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "benchmarks", "baselines.py"), run_name="__main__")
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(("| **", "seed 0: "))]
    assert any(line.startswith("| **ParetoSlider (paper)** | hypervolume") for line in table)
    assert len(table) == 2 + 3 and not any("held" in line for line in table)  # 2 methods; 3 goals, none held-out
    m = json.loads((tmp_path / "e" / "summary.json").read_text())["methods"]
    assert m["FixedWeight"]["heldout_hypervolume"] is None and len(m["ParetoSlider (paper)"]["hypervolume"]) == 1


def test_nft_loss_covers_audio_only_when_asked():
    # LTX-2's packed x0 = [video | audio]; Setup.nft_part (cfg.nft_audio False) restricts the NFT loss to the video:
    # changing the audio half of x0 then changes no loss, and with nft_audio it does
    from types import SimpleNamespace

    import sample

    class Net(torch.nn.Module):  # (video, audio) -> (video, audio) velocities, one adapter weight each
        def __init__(self):
            super().__init__()
            self.pref_w = torch.nn.Parameter(torch.tensor([0.5, -0.3]))

        def forward(self, video, audio, sigma, pref=None):
            return video * self.pref_w[0], audio * self.pref_w[1]

    net, g = Net(), torch.Generator().manual_seed(0)
    pack, unpack = sample.ltx2_packing((2, 3), (4,))
    x0, eps = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    t, p = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.1, 0.5, 1.0])
    cfg = SimpleNamespace(kl_beta=0.0, beta=0.1, adv_clip=5.0)
    old = {"pref_w": torch.tensor([0.4, -0.2])}

    def losses(x, part):  # the update's two passes on one micro-batch: the old policy without a graph, then the loss
        setup = train.Setup(net, [], {}, [], [], (10,), None, {}, pack=pack, unpack=unpack, nft_part=part)
        inputs = train.nft_inputs(x, eps, t, {}, None)
        with torch.no_grad(), train.policy(net, old):
            v_old = train.velocity(net, setup, *inputs)
        return train.update_losses(net, setup, x, *inputs, v_old, None, p, cfg)[0]

    x0b = x0.clone()
    x0b[:, 6:] += 1.0  # the audio part only
    for part, moves in ((lambda x: x[:, :6], False), (None, True)):
        a, b = losses(x0, part), losses(x0b, part)
        assert (a - b).abs().max().item() > 1e-3 if moves else torch.equal(a, b)
    video_only = losses(x0, lambda x: x[:, :6])
    assert torch.equal(net.pref_w.detach(), torch.tensor([0.5, -0.3]))  # the live weights are back after the old pass
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    want = train.nft_loss(xt[:, :6] * 0.5, xt[:, :6] * 0.4, x0[:, :6], xt[:, :6], t, p, 0.1, 5.0)
    assert torch.allclose(video_only, want, rtol=1e-6)


def test_ltx2_tiny_run(tmp_path):
    # the audio + video backbone through the same loop: video and audio packed in one x0, the image rewards scored
    # per frame, the slider picture's rows are time
    from PIL import Image

    res = train.main(
        [
            "--backbone",
            "ltx2",
            "--tiny",
            *TINY[3:],
            "--frames",
            "3",
            "--size",
            "16",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["frames"] == 3 and cfg["nft_audio"] is False
    assert res["objectives"] == ["tiny_photo", "tiny_sketch"] and len(res["sweep"]) == 3
    assert all(torch.isfinite(torch.tensor(s["rewards"] + s["heldout"])).all() for s in res["sweep"])
    grid = Image.open(tmp_path / "run" / "slider.png")
    assert grid.height > 2 * 3 * 96 and grid.width > 3 * 96  # 2 prompts x 3 frames of rows, 3 columns of w
    base = [f for f in os.listdir(tmp_path / "cache") if f.startswith("tiny_ltx2")]
    assert len(base) == 1 and model.load_transformer(tmp_path / "cache" / base[0]).cfg.in_channels == 48
    import sample  # the run folder rebuilds the pipeline: a 3-frame clip per w, side by side in one animation

    sample.main(
        [
            "--run",
            str(tmp_path / "run"),
            "--prompt",
            "a red circle",
            "--sweep",
            "3",
            "--out",
            str(tmp_path / "strip.webp"),
        ]
    )
    strip = Image.open(tmp_path / "strip.webp")
    assert strip.n_frames == 3 and strip.width >= 3 * 16


def test_offload_phases(tmp_path, monkeypatch):
    # --offload: the loop enters one phase at a time (the transformer samples, the VAE decodes, the rewards score,
    # the transformer trains), and the numbers are those of a run without it (on a CPU nothing moves; the phases are
    # what moves on a GPU: tests/ cannot pin host memory without one)
    made = []

    class Recorded(train.Phases):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(train, "Phases", Recorded)
    a = run(tmp_path, "--steps", "1", "--offload", name="offload")
    b = run(tmp_path, "--steps", "1", name="plain")
    assert made[0].on and not made[1].on and set(made[0].parts) == {"rewards", "vae", "net"}
    step = ["net", "vae", "rewards", "net"]  # rollout, decode, score, update
    points = (["net", "vae", "rewards"] * (len(a["sweep"]) + 1))[1:]  # the sweep and the base; "net" is on already
    assert made[0].log == ["setup"] + step + points == made[1].log
    assert a["hypervolume"] == b["hypervolume"] and a["sweep"] == b["sweep"]


def test_offload_moves_keep_values():
    # train.move, what --offload does to each module on the way to the host (here CPU to CPU, unpinned): a frozen
    # tensor's host copy is made once, then reused without copying back (it cannot have changed); a trained tensor is
    # copied back each time; torchao's int8 weights (a tensor subclass, which has no empty_like) move as
    # nn.Module.to moves them
    pytest.importorskip("torchao")
    lin = torch.nn.Linear(8, 8)
    lin.bias.requires_grad_(False)
    host, cpu = {}, torch.device("cpu")
    train.move(lin, cpu, host, pin=False)
    assert set(host) == {id(lin.weight), id(lin.bias)} and lin.bias.data_ptr() == host[id(lin.bias)].data_ptr()
    bias, weight = lin.bias.detach().clone(), torch.randn(8, 8)
    lin.weight.data, lin.bias.data = weight.clone(), torch.zeros(8)  # as if changed on the GPU
    train.move(lin, cpu, host, pin=False)
    assert torch.equal(lin.weight, weight) and torch.equal(host[id(lin.weight)], weight)  # copied back
    assert torch.equal(lin.bias, bias)  # frozen: its host copy, not the device's
    q = model.quantize_int8(torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16))
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = q(x)
    train.move(q[0], cpu, host, pin=False)
    assert type(q[0].weight).__name__ == "Int8Tensor" and torch.equal(q(x), y)


def wandb_records(path):
    # the history rows of an offline W&B run file (run-<id>.wandb): a 7-byte header, then LevelDB-style 32 KiB blocks
    # of chunked protobuf records (header: crc32, length, kind 1 full / 2 first / 3 middle / 4 last)
    from wandb.proto import wandb_internal_pb2

    buf, rows, part, pos = open(path, "rb").read(), [], b"", 7
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", buf[pos + 4 : pos + 7])
        part, pos = part + buf[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            part = b""
    return rows


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    # --wandb under WANDB_MODE=offline: an offline W&B run in the run folder with every epoch's scalars and, at the
    # evaluation, eval.json's numbers, the front and the slider grid; --resume appends to the same W&B run (same id)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, "--steps", "2", "--wandb", "tiny-test")
    d = tmp_path / "run"
    run_id = (d / "wandb.id").read_text()
    train.main(["--resume", str(d), "--steps", "3"])
    assert (d / "wandb.id").read_text() == run_id
    sessions = sorted((d / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)
    first, second = (wandb_records(s / f"run-{run_id}.wandb") for s in sessions)
    epochs = [r for r in first + second if "loss" in r]
    assert [r["_step"] for r in epochs] == [1, 2, 3]  # the resumed session goes on from step 3
    assert all({"reward/tiny_photo", "reward/tiny_sketch", "kl", "grad_norm", "seconds"} <= r.keys() for r in epochs)
    ev = json.loads((d / "eval.json").read_text())
    for rows in (first, second):  # each session ends with its evaluation
        last = [r for r in rows if "eval/hypervolume" in r][-1]
        assert last["eval/hypervolume"] == pytest.approx(
            ev["hypervolume"] if rows is second else last["eval/hypervolume"]
        )
        assert last["pareto/_type"] == last["slider/_type"] == "image-file" and last["eval/sweep/_type"] == "table-file"
    assert last["eval/hypervolume"] == pytest.approx(ev["hypervolume"])  # the resumed run's evaluation: eval.json's
    assert last["eval/spearman/tiny_photo"] == pytest.approx(ev["spearman"][0])
    for s in sessions:
        assert {p.name.split("_")[0] for p in (s / "files" / "media" / "images").glob("*.png")} == {"pareto", "slider"}


def test_optional_packages_refused_in_one_line(tmp_path, capsys, monkeypatch):
    # --wandb and --quantize need packages we do not require: without them, one line and exit 2 before any model loads
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("wandb", "torchao") else real(n, *a))
    for flags, msg in ((["--wandb", "p"], "--wandb p needs wandb: pip install wandb"),
                       (["--quantize", "int8"], "--quantize int8 needs torchao: pip install torchao")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "1", *flags)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_export_diffusers_from_a_tiny_run(tmp_path, capsys):
    # issue 24: sample.py --run DIR --export-diffusers F on a tiny SD3.5 run writes what diffusers'
    # StableDiffusion3Pipeline.lora_state_dict reads: every LoRA pair of the run's adapter, under diffusers' names
    from diffusers import StableDiffusion3Pipeline

    import sample

    run(tmp_path, "--steps", "1")
    out = tmp_path / "lora.safetensors"
    sample.main(["--run", str(tmp_path / "run"), "--export-diffusers", str(out)])
    assert "the slider needs sample.py" in capsys.readouterr().out
    sd = StableDiffusion3Pipeline.lora_state_dict(str(out))
    ours = [k for k in load_file(tmp_path / "run" / "adapters.safetensors") if "lora_" in k]
    assert sd and all(k.startswith("transformer.") for k in sd) and len(sd) >= len(ours) > 0  # fused qkv: split
    assert {k.replace("lora_A", "lora_B") for k in sd if "lora_A" in k} == {k for k in sd if "lora_B" in k}
