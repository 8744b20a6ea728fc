# sample.py against independent oracles: diffusers' schedulers and SD3 pipeline (test-only dependency) and
# closed-form ODE solutions. CPU, tiny sizes.
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model  # noqa: E402
import sample  # noqa: E402

diffusers = pytest.importorskip("diffusers")


def standin_net(x, sigma, context, pooled, pref=None):
    # a smooth nonlinear velocity field that uses every input, so wrong plumbing changes the result
    v = torch.tanh(x) * sigma.view(-1, 1, 1, 1) + torch.cos(3 * x) * (1 - sigma.view(-1, 1, 1, 1))
    v = v + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + pooled.mean(1).view(-1, 1, 1, 1)
    if pref is not None:
        v = v + pref[:, :1].view(-1, 1, 1, 1) * x
    return v


def standin_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, 5, 3, generator=g)
    cond = dict(context=torch.randn(b, 7, 6, generator=g), pooled=torch.randn(b, 5, generator=g))
    return x, cond


# ---------------------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("steps", [1, 4, 25, 28, 40])
def test_schedule_matches_diffusers(steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    ours = sample.get_schedule(steps, shift=3.0)
    assert ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours, sched.sigmas, atol=0, rtol=0)


@pytest.mark.parametrize("steps,tokens", [(1, 4096), (4, 1024), (28, 4096), (30, 64), (25, 8000)])
def test_flux_schedule_matches_diffusers(steps, tokens):
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert sample.flux_mu(tokens) == pytest.approx(mu, rel=1e-12)
    torch.testing.assert_close(sample.get_flux_schedule(steps, tokens), sched.sigmas, atol=1e-7, rtol=0)


def test_time_shift_closed_form():
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(sample.time_shift(s, 3.0), torch.tensor([0.0, 0.75, 1.0]))


# ---------------------------------------------------------------------------------------------------------------
# solvers


def test_euler_matches_diffusers_scheduler():
    x, cond = standin_inputs()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(12)
    ref = x.clone()
    for t in sched.timesteps:
        sigma = torch.full((x.shape[0],), t.item() / 1000)
        ref = sched.step(standin_net(ref, sigma, **cond), t, ref).prev_sample
    ours = sample.denoise(standin_net, x, sample.get_schedule(12), cond, solver="euler")
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def dpm_scheduler():
    return diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=3.0,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )


@pytest.mark.parametrize("own_schedule", [False, True])
@pytest.mark.parametrize("steps", [6, 25])
def test_dpm2_matches_diffusers_dpmsolver(steps, own_schedule):
    # diffusers' own flow sigmas start below 1 (every middle step genuinely second order); our SD3 schedule starts
    # at σ = 1 exactly, as the reference rollouts do (DiffusionNFT flow_grpo/diffusers_patch/solver.py)
    x, cond = standin_inputs()
    sched = dpm_scheduler()
    sched.set_timesteps(steps)
    if own_schedule:
        sched.sigmas = sample.get_schedule(steps)
    sigmas = sched.sigmas.clone()
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        v = standin_net(ref, torch.full((x.shape[0],), sigmas[i].item()), **cond)
        ref = sched.step(v, t, ref).prev_sample
    ours = sample.denoise(standin_net, x, sigmas, cond, solver="dpm2")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, sample.denoise(standin_net, x, sigmas, cond, solver="euler"), atol=1e-3)


def test_solvers_exact_on_single_point_data():
    # data = one point x0*: v = (x - x0*)/σ exactly, both solvers land on x0* with any schedule
    target = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    net = lambda x, sigma, pref=None: (x - target) / sigma.view(-1, 1, 1, 1)
    x = sample.noise_like(target.shape, seed=3)
    for solver in ("euler", "dpm2"):
        for steps in (1, 2, 7):
            out = sample.denoise(net, x, sample.get_schedule(steps), {}, solver=solver)
            torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def gaussian_problem(s_lo, s_hi):
    # data ~ N(μ, s²) per coordinate: E[x0|x_σ] is linear, v = (x - E[x0|x_σ])/σ, and the exact probability-flow map
    # sends noise ε to μ + s·ε
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(64, generator=g), s_lo + (s_hi - s_lo) * torch.rand(64, generator=g)

    def net(x, sigma, pref=None):
        t = sigma.view(-1, 1)
        x0_hat = mu + (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)
        return (x - x0_hat) / t

    eps = torch.randn(4, 64, generator=g, dtype=torch.float64)
    return net, eps, mu + s * eps


def solve_error(problem, solver, sigmas):
    net, eps, exact = problem
    return (sample.denoise(net, eps, sigmas, {}, solver=solver) - exact).abs().max().item()


def test_dpm2_beats_euler_at_10_steps():
    # uniform σ grid: dpm2 is far closer to the exact flow map. (On the SD3 shift-3 grid at 10-25 steps dpm2 is
    # not better in this test: its second-to-last λ step is ~5x the previous one and the multistep extrapolation
    # overshoots; that is the reference's behaviour, reproduced as is.)
    problem, sigmas = gaussian_problem(0.5, 2.0), torch.linspace(1, 0, 11)
    assert solve_error(problem, "dpm2", sigmas) < solve_error(problem, "euler", sigmas) / 3


def test_convergence_orders_on_sd3_schedule():
    problem = gaussian_problem(0.1, 2.0)
    err = {
        (solver, n): solve_error(problem, solver, sample.get_schedule(n))
        for solver in ("euler", "dpm2")
        for n in (80, 160)
    }
    assert 1.8 < err["euler", 80] / err["euler", 160] < 2.2  # first order: halves
    assert err["dpm2", 80] / err["dpm2", 160] > 3.5  # second order: quarters


def test_cfg_is_one_batched_forward():
    x, cond = standin_inputs(b=3)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    pref = torch.tensor([[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]])
    calls = []

    def net(x, sigma, context, pooled, pref=None):
        calls.append((x.shape[0], pref.shape[0]))
        return standin_net(x, sigma, context, pooled, pref)

    out = sample.denoise(net, x, sample.get_schedule(3), cond, pref, guidance=4.0, uncond=uncond)
    assert calls == [(6, 6)] * 3
    sig, ref = sample.get_schedule(3).tolist(), x.clone()
    for s, s_next in zip(sig[:-1], sig[1:]):
        sb = torch.full((3,), s)
        v_c, v_u = standin_net(ref, sb, **cond, pref=pref), standin_net(ref, sb, **uncond, pref=pref)
        ref = ref + (s_next - s) * (v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_noise_is_deterministic_per_seed():
    a, b, c = sample.noise_like((2, 3), 5), sample.noise_like((2, 3), 5), sample.noise_like((2, 3), 6)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# text encoders: parity with diffusers' StableDiffusion3Pipeline.encode_prompt on tiny components

VOCAB = ["a", "red", "blue", "green", "circle", "ring", "square", "photo", "sketch", "of"]
PROMPTS = ["a red circle", "A Blue RING of green", "an unknown photo"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    # a diffusers-style SD3.5 folder: tiny text encoders + tokenizers and a tiny pixel-space transformer (no vae/)
    d = tmp_path_factory.mktemp("tiny_sd35")
    enc = sample.tiny_text_encoders(VOCAB, clip_dims=(16, 24), t5_dim=48, clip_len=10, t5_len=6)
    for sub, obj in [
        ("text_encoder", enc.clip_l),
        ("text_encoder_2", enc.clip_g),
        ("text_encoder_3", enc.t5),
        ("tokenizer", enc.tok_l),
        ("tokenizer_2", enc.tok_g),
        ("tokenizer_3", enc.tok_t5),
    ]:
        obj.save_pretrained(d / sub)
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=40,
        pos_embed_max_size=16,
    )
    tr.save_pretrained(d / "transformer")
    return d, enc, tr


@pytest.mark.parametrize("with_t5", [True, False])
def test_encode_prompts_match_diffusers_pipeline(repo, with_t5):
    d, enc, tr = repo
    ours = sample.load_text_encoders(str(d), t5=with_t5)
    assert (ours.t5 is not None) == with_t5
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tr,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=enc.clip_l,
        tokenizer=enc.tok_l,
        text_encoder_2=enc.clip_g,
        tokenizer_2=enc.tok_g,
        text_encoder_3=enc.t5 if with_t5 else None,
        tokenizer_3=enc.tok_t5 if with_t5 else None,
    )
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=7
        )
    if not with_t5:
        ours.context_dim = 48  # the real folder default is 4096 (SD3.5's joint_attention_dim)
    context, pooled = sample.encode_prompts(ours, PROMPTS, t5_len=7)
    assert context.shape == (3, 10 + 7, 48) and pooled.shape == (3, 16 + 24)
    torch.testing.assert_close(context, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)
    assert context[:, 10:].abs().sum() > 0 if with_t5 else context[:, 10:].abs().sum() == 0


def test_flux_encode_prompts_match_diffusers_pipeline(tmp_path):
    # T5 states + CLIP-L pooler, as FluxKontextPipeline.encode_prompt, from a saved diffusers-style folder
    enc = sample.tiny_flux_text_encoders(VOCAB, seed=3, t5_len=6)
    for sub, obj in [
        ("text_encoder", enc.clip),
        ("tokenizer", enc.tok_clip),
        ("text_encoder_2", enc.t5),
        ("tokenizer_2", enc.tok_t5),
    ]:
        obj.save_pretrained(tmp_path / sub)
    ours = sample.load_flux_text_encoders(str(tmp_path))
    ours.t5_len = 6
    pipe = diffusers.FluxKontextPipeline(
        transformer=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=enc.clip,
        tokenizer=enc.tok_clip,
        text_encoder_2=enc.t5,
        tokenizer_2=enc.tok_t5,
    )
    with torch.no_grad():
        ref, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=6)
    context, pooled = sample.encode_flux_prompts(ours, PROMPTS)
    assert context.shape == (3, 6, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(context, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(pooled[0], pooled[1])


def test_load_text_encoders_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a diffusers folder nor a hub id"):
        sample.load_text_encoders(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(FileNotFoundError, match="text_encoder is missing"):
        sample.load_text_encoders(str(tmp_path))


def test_tiny_text_encoders_deterministic_and_distinct():
    a, b = sample.tiny_text_encoders(VOCAB, seed=0), sample.tiny_text_encoders(VOCAB, seed=0)
    ca, pa = sample.encode_prompts(a, PROMPTS)
    cb, pb = sample.encode_prompts(b, PROMPTS)
    assert ca.shape == (3, 8 + 8, 64) and pa.shape == (3, 64)
    assert torch.equal(ca, cb) and torch.equal(pa, pb)
    for i in range(3):  # every prompt differs from every other, in both outputs
        for j in range(i):
            assert not torch.allclose(ca[i], ca[j]) and not torch.allclose(pa[i], pa[j])
    c_other, _ = sample.encode_prompts(sample.tiny_text_encoders(VOCAB, seed=1), PROMPTS)
    assert not torch.allclose(ca, c_other)


# ---------------------------------------------------------------------------------------------------------------
# images and the CLI


@pytest.fixture(scope="module")
def adapter(repo, tmp_path_factory):
    # a two-objective adapter with random (non-zero) LoRA and preference weights, so that ω visibly matters
    import model

    net = model.load_transformer(str(repo[0]), pref_dim=2)
    model.add_lora(net, rank=2, alpha=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_state(net).values():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    model.save_adapters(net, str(path))
    return net.eval(), str(path)


def test_pipeline_pixel_space(repo, adapter):
    net, enc = adapter[0], sample.load_text_encoders(str(repo[0]))
    pipe = sample.Pipeline(net, None, enc, lambda ps: sample.sd3_cond(enc, ps))

    def run(pref, seed, guidance=1.0, solver="euler"):
        cond, uncond = pipe.conditions(PROMPTS[:2], guidance)
        return pipe.generate(cond, uncond, pref, 3, seed, 16, 16, guidance, solver)

    img = run([0.3, 0.7], 0)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, run([0.3, 0.7], 0))
    assert not torch.allclose(img, run([0.3, 0.7], 1))
    assert not torch.allclose(img, run([0.9, 0.1], 0))
    assert not torch.allclose(img, run([0.3, 0.7], 0, guidance=3.0, solver="dpm2"))


def test_generate_decodes_latents_with_the_vae():
    # latent path: noise at size/8 with the net's channel count, x0 handed to vae.decode
    class Net(torch.nn.Linear):  # a module with one parameter (device/dtype) and the stand-in velocity
        cfg = type("cfg", (), {"in_channels": 16})
        forward = staticmethod(standin_net)

    class VAE(torch.nn.Linear):
        seen = []

        def decode(self, z):
            self.seen.append(z.shape)
            return torch.sigmoid(torch.nn.functional.interpolate(z[:, :3], scale_factor=8))

    vae, (_, cond) = VAE(1, 1), standin_inputs(b=2)
    img = sample.Pipeline(Net(1, 1), vae).generate(cond, None, None, 3, 0, 48, 48)
    assert vae.seen == [(2, 16, 6, 6)] and img.shape == (2, 3, 48, 48)


def cli(*args):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stderr


def test_cli_sweep_writes_strip(repo, adapter, tmp_path):
    out = tmp_path / "strip.png"
    code, err = cli(
        "--weights",
        str(repo[0]),
        "--lora",
        adapter[1],
        "--prompt",
        "a red ring",
        "--sweep",
        "3",
        "--steps",
        "2",
        "--size",
        "16",
        "--out",
        str(out),
    )
    assert code == 0, err
    from PIL import Image

    strip = Image.open(out)  # 16 px tiles are enlarged 10x so that the labels (in a band above them) fit
    assert strip.width == 3 * 160 and strip.height > 160
    band = strip.height - 160
    tiles = [strip.crop((160 * i, band, 160 * (i + 1), band + 160)).tobytes() for i in range(3)]
    assert len(set(tiles)) == 3  # ω changes the image
    assert len(set(strip.crop((0, 0, 480, band)).get_flattened_data())) > 1  # the ω labels were drawn


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pref", "0.5,0.6"], "not on the simplex"),
        (["--pref", "-0.2"], "not on the simplex"),
        (["--pref", "abc"], "expected a number"),
        (["--pref", "0.2,0.3,0.5"], "3 entries but the model was trained with 2 objectives"),
        (
            ["--pref", "0.3", "--lora", "/no/such/adapter.safetensors"],
            "--lora /no/such/adapter.safetensors: no such file",
        ),
        (["--pref", "0.3", "--weights", "/no/such/folder"], "--weights /no/such/folder: no such file or folder"),
        (["--pref", "0.3", "--lora", ""], "no preference input (pref_dim=0): pass its adapter with --lora"),
        (["--sweep", "1"], "--sweep 1: needs N from 2 to 64"),
        (["--size", "24"], "multiple of 16"),
    ],
)
def test_cli_bad_input(repo, adapter, tmp_path, capsys, args, message):
    # in-process for speed (main() is what the script runs); test_cli_process checks the real process
    opts = {
        "--weights": str(repo[0]),
        "--lora": adapter[1],
        "--prompt": "a red ring",
        "--size": "16",
        "--out": str(tmp_path / "x.png"),
        **dict(zip(args[::2], args[1::2])),
    }
    with pytest.raises(SystemExit) as e:
        sample.main([s for kv in opts.items() if kv[1] for s in kv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_process_bad_input(repo, tmp_path):
    code, err = cli("--weights", str(repo[0]), "--prompt", "a", "--pref", "0.2,0.9", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "not on the simplex" in err and "Traceback" not in err, err


def test_end_to_end_matches_diffusers_sd3_pipeline(repo, tmp_path):
    # latent path through the CLI (our transformer, VAE, encoders, schedule, CFG) against diffusers'
    # StableDiffusion3Pipeline on the same tiny weights and the same initial noise
    d, enc, _ = repo
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        os.symlink(d / sub, tmp_path / sub)
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=40,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    with torch.no_grad():  # random everything, so that no term hides behind an init
        for p in list(tr.parameters()) + list(vae.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    tr.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "img.png"
    sample.main(
        [
            "--weights",
            str(tmp_path),
            "--prompt",
            "a blue square",
            "--guidance",
            "2.5",
            "--steps",
            "3",
            "--size",
            "32",
            "--seed",
            "7",
            "--out",
            str(out),
        ]
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tr,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=enc.clip_l,
        tokenizer=enc.tok_l,
        text_encoder_2=enc.clip_g,
        tokenizer_2=enc.tok_g,
        text_encoder_3=enc.t5,
        tokenizer_3=enc.tok_t5,
    )
    with torch.no_grad():
        ref = pipe(
            "a blue square",
            guidance_scale=2.5,
            num_inference_steps=3,
            height=32,
            width=32,
            latents=sample.noise_like((1, 16, 4, 4), 7),
            output_type="pt",
        ).images
    from PIL import Image

    ours = torch.tensor(list(Image.open(out).get_flattened_data()), dtype=torch.float32)
    ref = (ref[0].permute(1, 2, 0).reshape(-1, 3) * 255).round()
    assert ours.shape == ref.shape and ref.std() > 10  # a non-trivial image
    assert (ours - ref).abs().max() <= 1  # equal up to 8-bit rounding


def test_export_diffusers_cli(repo, adapter, tmp_path, capsys):
    # the adapter's LoRA as diffusers loads it, from the command line: the same tensors and header as the library call
    from safetensors.torch import load_file

    out = tmp_path / "lora.safetensors"
    sample.main(["--weights", str(repo[0]), "--lora", adapter[1], "--export-diffusers", str(out)])
    assert "not in it: the slider needs sample.py" in capsys.readouterr().out
    model.export_lora_diffusers(adapter[0], str(tmp_path / "direct.safetensors"))
    a, b = load_file(out), load_file(tmp_path / "direct.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and any("lora_A" in k for k in a)
    meta = model.read_safetensors_meta(str(out))
    assert json.loads(meta["lora_adapter_metadata"])["transformer.r"] == adapter[0].lora_config["rank"]
    with pytest.raises(SystemExit):
        sample.main(["--weights", str(repo[0]), "--lora", adapter[1], "--export-diffusers", str(out), "--pref", "0.5"])
