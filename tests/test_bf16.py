"""The path users run: a bf16 base with fp32 adapters (model.py's precision policy), on a CPU. For every backbone's
full-size path (a tiny random diffusers folder standing in for the release): train a few steps, checkpoint, resume,
sample; every trainable tensor and everything that shadows one (AdamW moments, old policy, EMA) is fp32, the numbers
are finite, the preference modules move in a bf16 step. And on the tiny default in bf16: the update evaluates the
network at exactly the rollout's sigmas, in fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file

import model
import sample
import train
from tiny_repos import flux_repo, ltx2_repo, sd35_repo

pytest.importorskip("diffusers")

FLAGS = [
    "--device",
    "cpu",
    "--dtype",
    "bf16",
    "--prompts-per-step",
    "2",
    "--prefs-per-prompt",
    "1",
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
    "--lora-alpha",
    "4",
    "--batch",
    "2",
    "--ckpt-every",
    "1",
    "--grad-ckpt",
]
# backbone -> (folder builder, its data and training flags, sample.py flags)
BACKBONES = {
    "sd35": (
        sd35_repo,
        lambda d: ["--prompts", str(d / "prompts.txt"), "--size", "32", "--rewards", "tiny_photo,tiny_sketch"],
        ["--prompt", "a red circle"],
    ),
    "flux-kontext": (
        flux_repo,
        lambda d: ["--edits", str(d / "edits"), "--size", "32", "--rewards", "tiny_preserve,tiny_adhere"],
        ["--prompt", "make it blue", "--image", "edits/0.png"],
    ),
    "ltx2": (
        ltx2_repo,
        lambda d: [
            "--prompts",
            str(d / "prompts.txt"),
            "--size",
            "64",
            "--frames",
            "9",
            "--rewards",
            "tiny_photo,tiny_sketch",
        ],
        ["--prompt", "a red circle"],
    ),
}


def adapter_init(repo, cfg):
    # the adapters as train.py draws them before any step: the seed, then the preference modules, then LoRA (the
    # base's values do not enter the draw, so the transformer alone, in fp32, stands in for the whole pipeline)
    net = model.load_transformer(repo / "transformer")
    torch.manual_seed(cfg["seed"])
    model.add_preference(net, 2)
    model.add_lora(net, cfg["lora_rank"], cfg["lora_alpha"])
    return {n: p.detach().clone() for n, p in model.adapter_state(net).items()}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_bf16_full_size_path(backbone, tmp_path):
    build, data, sample_flags = BACKBONES[backbone]
    repo, run = tmp_path / "repo", tmp_path / "run"
    repo.mkdir()
    build(repo)
    train.main(["--backbone", backbone, "--weights", str(repo), *data(repo), *FLAGS, "--steps", "2", "--out", str(run)])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["dtype"] == "bf16"
    ck = load_file(run / "checkpoint.safetensors")
    init = adapter_init(repo, cfg)
    floats = {k: v for k, v in ck.items() if k != "rng.train"}
    kinds = {k.split(".")[0] for k in floats}
    assert kinds == {"policy", "old", "ema", "opt"}
    assert {k.rsplit(".", 1)[1] for k in floats if k.startswith("opt.")} == {"step", "exp_avg", "exp_avg_sq"}
    for k, v in floats.items():  # masters, their moments and both shadows: fp32, finite
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    assert {k[len("policy.") :] for k in floats if k.startswith("policy.")} == set(init)
    # the preference modules moved: after two bf16 steps nearly every element of every pref_* tensor differs from its
    # init, pref_mlp's first layer included (U(+-0.71): where two Adam steps of ~3e-4 are under half a bf16 ulp, bf16
    # weights would not have moved: more than half of them, counted below). The slider's last layer is the exception
    # by design: it starts at zero, and its columns fed by ReLU units dead for this batch's w get no gradient.
    moved = {n: (ck[f"policy.{n}"] != init[n]).float().mean().item() for n in init if n.startswith("pref_")}
    assert len(moved) == 14 and all(f > 0.9 for n, f in moved.items() if n != "pref_slider.mlp.6.weight"), moved
    assert moved["pref_slider.mlp.6.weight"] > 0.5, moved
    w0, w2 = init["pref_mlp.0.weight"], ck["policy.pref_mlp.0.weight"]
    lost_in_bf16 = ((w0.bfloat16() + (w2 - w0)).bfloat16() == w0.bfloat16()).float().mean().item()
    assert lost_in_bf16 > 0.5, lost_in_bf16
    # resume continues in bf16 with fp32 masters, and sample.py --run slides the run
    train.main(["--resume", str(run), "--steps", "3"])
    ck3 = load_file(run / "checkpoint.safetensors")
    assert all(ck3[k].dtype == torch.float32 and torch.isfinite(ck3[k]).all() for k in floats)
    assert any(not torch.equal(ck3[k], ck[k]) for k in floats if k.startswith("policy."))
    ev = json.loads((run / "eval.json").read_text())
    assert len(ev["sweep"]) == 3 and all(torch.isfinite(torch.tensor(s["rewards"])).all() for s in ev["sweep"])
    flags = [f if f != "edits/0.png" else str(repo / "edits" / "0.png") for f in sample_flags]
    out = tmp_path / ("strip.webp" if backbone == "ltx2" else "strip.png")
    sample.main(["--run", str(run), *flags, "--sweep", "3", "--steps", "2", "--dtype", "bf16", "--out", str(out)])
    assert out.stat().st_size > 100


def test_update_calls_the_net_at_the_rollout_sigmas(tmp_path, monkeypatch):
    # a bf16 tiny run: every sigma the network sees is fp32; the update's (with a graph) are among the rollouts'
    # exactly (the rollout's sigmas are the schedule's; a bf16 sigma would be off by up to 4 of 1000 timestep units);
    # the update's x_t reaches the net in fp32 (cast once, inside)
    flags = [
        "--backbone",
        "sd35",
        "--tiny",
        "--dtype",
        "bf16",
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
        "4",
        "--eval-points",
        "2",
        "--eval-prompts",
        "1",
        "--lora-rank",
        "4",
        "--batch",
        "4",
        "--cache",
        str(tmp_path / "cache"),
    ]
    train.main(flags + ["--steps", "1", "--out", str(tmp_path / "first")])  # pretrains the cached base (with a graph)
    seen = []
    forward = model.SD3Transformer.forward

    def spy(self, x, sigma, *a, **k):
        seen.append((torch.is_grad_enabled(), sigma.dtype, x.dtype, sigma.tolist()))
        return forward(self, x, sigma, *a, **k)

    monkeypatch.setattr(model.SD3Transformer, "forward", spy)
    train.main(flags + ["--steps", "2", "--out", str(tmp_path / "run")])
    no_graph = {s for grad, _, _, sig in seen if not grad for s in sig}  # rollouts, the update's first pass, eval
    update = [(s, xd) for grad, _, xd, sig in seen if grad for s in sig]
    schedule = set(sample.get_schedule(4, 1.0)[:-1].tolist())
    assert len(update) == 2 * 8 * 3 and no_graph == schedule and {s for s, _ in update} <= schedule
    assert all(sd == torch.float32 for _, sd, _, _ in seen) and all(xd == torch.float32 for _, xd in update)


def test_int8_base(tmp_path):
    # --quantize int8: the frozen base's Linear weights int8 weight-only (torchao), the adapters fp32 on top. The tiny
    # base's rollouts (same noise) stay within a mean 0.02 / max 0.1 of the bf16 base's on its [-1.5, 1.5] range
    # (measured 0.005 / 0.03: bf16's own distance to fp32), and a run trains through the int8 weights
    from test_train import TINY

    cfg = train.parse_config(TINY + ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "x")])
    setup = train.sd35_tiny_setup(cfg, 2, "cpu")
    noise = torch.randn(8, *setup.x0_shape, generator=torch.Generator().manual_seed(0))
    cond, sigmas = train.lookup(setup, torch.arange(8), "cpu"), train.schedule(cfg, setup)
    bf16 = setup.net.to(torch.bfloat16)
    with torch.no_grad():
        ref = train.rollout(bf16, setup, noise, cond, None, sigmas, cfg)
        int8 = model.quantize_int8(bf16)
        weights = {type(m.weight).__name__ for m in int8.modules() if isinstance(m, torch.nn.Linear)}
        d = (train.rollout(int8, setup, noise, cond, None, sigmas, cfg) - ref).abs()
    assert weights == {"Int8Tensor"} and 0 < d.mean() <= 0.02 and d.max() <= 0.1
    flags = ["--cache", str(tmp_path / "cache"), "--steps", "1", "--dtype", "bf16", "--quantize", "int8"]
    train.main(TINY + flags + ["--out", str(tmp_path / "run")])
    ck = load_file(tmp_path / "run" / "checkpoint.safetensors")
    lora_b = [v for k, v in ck.items() if k.startswith("policy.") and k.endswith("lora_B")]
    assert lora_b and all(v.dtype == torch.float32 for v in lora_b) and any(v.abs().max() > 0 for v in lora_b)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["quantize"] == "int8"
