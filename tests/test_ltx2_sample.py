"""sample.py's LTX-2 path against diffusers (the oracle): the token-count-shifted schedule, the text encoding (Gemma-3 +
connectors) and a whole sampling run with decoded video and sound (LTX2Pipeline on the same tiny random components
and the same initial noise); then the CLI on a tiny diffusers-layout folder and on a tiny pixel-space run folder
(animated WebP / GIF, the --sweep strip, --audio's WAV, bad input) and the serve page's animated WebP. CPU, tiny."""

import io
import json
import wave
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import model
import sample

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline, calculate_shift  # noqa: E402
from PIL import Image  # noqa: E402

from tiny_repos import CONNECTORS_META, VOCAB, ltx2_repo  # noqa: E402

PROMPTS = ["a red circle", "A Blue RING of green", "an unknown photo"]


# ---------------------------------------------------------------------------------------------------------------------
# the schedule: LTX2Pipeline's scheduler configuration (the release's scheduler/scheduler_config.json)


def ltx2_scheduler():
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )


@pytest.mark.parametrize("steps", [2, 3, 8, 30, 40])
@pytest.mark.parametrize("tokens", [1, 256, 1024, 3000, 6144, 24576])
def test_schedule_matches_diffusers(steps, tokens):
    sched = ltx2_scheduler()
    mu = calculate_shift(tokens, 1024, 4096, 0.95, 2.05)  # as LTX2Pipeline.__call__ (pipeline_ltx2.py:1345-1369)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert sample.ltx2_mu(tokens) == mu
    ours = sample.ltx2_schedule(steps, tokens)
    assert ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0 and abs(ours[-2].item() - 0.1) < 1e-6
    torch.testing.assert_close(ours, sched.sigmas, atol=0, rtol=0)  # bit for bit


def test_schedule_one_step_and_shift():
    assert sample.ltx2_schedule(1, 6144).tolist() == [1.0, 0.0]  # diffusers divides 0 by 0 here
    few, many = sample.ltx2_schedule(8, 256), sample.ltx2_schedule(8, 24576)
    assert bool((many[1:-2] > few[1:-2]).all())  # more tokens, more time at high noise


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return ltx2_repo(tmp_path_factory.mktemp("ltx2_repo"))


def ref_text(r, prompts, max_len=1024):
    # LTX2Pipeline's prompt path: Gemma-3's stacked hidden states (_get_gemma_prompt_embeds), then its connectors
    with torch.no_grad():
        embeds, mask = LTX2Pipeline._get_gemma_prompt_embeds(
            SimpleNamespace(tokenizer=r.tok, text_encoder=r.gemma),
            prompts,
            max_sequence_length=max_len,
            device="cpu",
            dtype=torch.float32,
        )
        return r.connectors(embeds, mask, padding_side="left")


def check_text(enc, r, what):
    ours = sample.encode_ltx2_prompts(enc, PROMPTS)
    context, context_audio, mask = ref_text(r, PROMPTS, enc.max_len)
    assert ours["context"].shape == (3, enc.max_len, 16) and "context_mask" not in ours  # all ones: no mask
    err = max(
        (ours["context"] - context).abs().max().item(), (ours["context_audio"] - context_audio).abs().max().item()
    )
    print(f"LTX-2 text encoding ({what}, {enc.max_len} tokens): max abs err {err:.2e}")
    assert err <= 1e-5 and bool(mask.all())  # diffusers' connector mask: all ones, what no mask means


def test_text_encoder_matches_diffusers(repo):
    enc = sample.load_ltx2_text_encoder(str(repo.root))  # a diffusers LTX-2 folder
    assert enc.max_len == 1024 and not hasattr(enc.gemma, "vision_tower")  # the language model only
    check_text(enc, repo, "diffusers folder")
    enc.max_len = 8  # prompts filling most of the window too: padding of 4 to 6 tokens, truncation of none
    check_text(enc, repo, "diffusers folder")
    c = sample.encode_ltx2_prompts(enc, PROMPTS)["context"]
    assert not torch.allclose(c[0], c[1], atol=1e-3)


def test_text_encoder_gemma_folder_and_combined_connectors(repo, tmp_path):
    # a plain Gemma-3 folder (weights and tokenizer side by side) + the connectors from Lightricks' combined file
    gemma_dir = tmp_path / "gemma"
    repo.gemma.save_pretrained(gemma_dir)
    repo.tok.save_pretrained(gemma_dir)
    sd = {model.ltx2_connector_key(k, to_diffusers=False): v for k, v in repo.connectors.state_dict().items()}
    sd = {k if k.startswith("text_embedding_projection.") else f"model.diffusion_model.{k}": v for k, v in sd.items()}
    sd["vae.per_channel_statistics.mean-of-means"] = torch.zeros(4)
    combined = tmp_path / "ltx-2.safetensors"
    save_file(sd, combined, metadata={"config": json.dumps({"transformer": CONNECTORS_META})})
    enc = sample.load_ltx2_text_encoder(str(gemma_dir), connectors=str(combined))
    enc.max_len = 8
    check_text(enc, repo, "Gemma-3 folder + combined file")
    with pytest.raises(FileNotFoundError, match="has no connectors/"):
        sample.load_ltx2_text_encoder(str(gemma_dir))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        sample.load_ltx2_text_encoder(str(combined))
    with pytest.raises(FileNotFoundError, match="no Gemma-3 in"):
        sample.load_ltx2_text_encoder(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# a whole sampling run against LTX2Pipeline: our loader, schedule, text path, transformer, packing, Euler loop, VAE,
# audio VAE and vocoder; same initial noise; STG, modality guidance and the CFG rescale off on both sides


@pytest.mark.parametrize("fps,cfg", [(24.0, 1.0), (12.0, 3.0)])
def test_sampling_matches_diffusers_pipeline(repo, fps, cfg):
    # cfg > 1: classifier-free guidance with the empty negative prompt, one scale for video and audio (diffusers
    # guides in x0 space, x0 = x - σv: the same as guiding v)
    pipe = sample.load_ltx2(dict(weights=str(repo.root), audio=True, fps=fps))
    cond, uncond = pipe.conditions(["a red circle"], cfg)
    H, W, T, steps, seed = 64, 64, 9, 3, 7
    shape = pipe.x0_shape(H, W, frames=T)
    A = round(T / fps * 25)  # 25 audio latent frames per second
    assert shape == (8 * 2 * 2 * 2 + 8 * A * 4,)
    x0 = pipe.generate(cond, uncond, None, steps, seed, H, W, cfg, frames=T, decode=False)
    video, (wav, rate) = pipe.decode(x0), pipe.audio(x0)
    assert video.shape == (1, T, 3, H, W) and wav.shape == (1, 2, (4 * A - 3) * 40) and rate == 24000

    v_noise, a_noise = pipe.packing(H, W, frames=T)[1](sample.noise_like((1, *shape), seed))
    ref = LTX2Pipeline(
        scheduler=ltx2_scheduler(),
        vae=repo.vae,
        audio_vae=repo.audio_vae,
        text_encoder=repo.gemma,
        tokenizer=repo.tok,
        connectors=repo.connectors,
        transformer=repo.transformer,
        vocoder=repo.vocoder,
    )
    # the tiny VAE compresses 8 x 32 x 32 like the release, but reports 16 and 64 (diffusers derives the ratios from
    # spatio_temporal_scaling, which the release's down-block types override): the pipeline must use the real ones
    ref.vae_temporal_compression_ratio, ref.vae_spatial_compression_ratio = 8, 32
    av = repo.audio_vae  # the pipeline normalises given audio latents (not the packed video ones): undo it
    a_raw = LTX2Pipeline._denormalize_audio_latents(
        LTX2Pipeline._pack_audio_latents(a_noise), av.latents_mean, av.latents_std
    )
    with torch.no_grad():
        rv, ra = ref(
            "a red circle",
            height=H,
            width=W,
            num_frames=T,
            frame_rate=fps,
            num_inference_steps=steps,
            guidance_scale=cfg,
            stg_scale=0.0,
            modality_scale=1.0,
            guidance_rescale=0.0,
            audio_guidance_scale=cfg,
            audio_stg_scale=0.0,
            audio_modality_scale=1.0,
            audio_guidance_rescale=0.0,
            latents=v_noise.flatten(2).transpose(1, 2),
            audio_latents=a_raw,
            output_type="pt",
            return_dict=False,
        )
    ev, ea = (video - rv).abs().max().item(), ((wav - ra).norm() / ra.norm()).item()
    print(
        f"LTX-2 sampling vs LTX2Pipeline at {fps} fps, guidance {cfg}: video max abs err {ev:.2e}, "
        f"audio rel err {ea:.2e}"
    )
    assert rv.shape == video.shape and ra.shape == wav.shape and rv.std() > 0.05 and ra.std() > 1e-3
    assert ev <= 1e-4 and ea <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# the CLI


def frames_of(path):  # -> (format, the frames as RGB PIL images) of an animated image
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(im.convert("RGB").copy())
        return im.format, out


def read_wav(path):  # -> ((channels, bytes per sample, rate, samples), the PCM bytes)
    with wave.open(str(path)) as w:
        return (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()), w.readframes(w.getnframes())


def combined_file(r, path):
    # Lightricks' layout of the same tiny weights: the DiT and the connectors under model.diffusion_model. (the
    # Gemma feature projection beside), vae.*, audio_vae.*, vocoder.*, and the config in the metadata
    m = model
    net, vae = m.load_transformer(r.root), m.load_vae(r.root)
    sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}
    for k, v in r.connectors.state_dict().items():
        k = m.ltx2_connector_key(k, to_diffusers=False)
        sd[k if k.startswith("text_embedding_projection.") else f"model.diffusion_model.{k}"] = v
    sd.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    sd.update({f"audio_vae.{m.ltx2_audio_key(k, to_diffusers=False)}": v for k, v in r.audio_vae.state_dict().items()})
    sd.update({f"vocoder.{m.ltx2_audio_key(k, to_diffusers=False)}": v for k, v in r.vocoder.state_dict().items()})
    config = json.loads(m.ltx2_file_metadata(net.cfg)["config"])
    config["transformer"].update(CONNECTORS_META)
    config.update(
        audio_vae={"model": {"params": {"ddconfig": {"causality_axis": "height", "mel_bins": 16}}}},
        vocoder={"upsample_rates": [5, 4, 2], "upsample_kernel_sizes": [11, 8, 4], "resblock": "1"},
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"config": json.dumps(config)})
    return str(path)


def test_cli_full_size_with_audio(repo, tmp_path, capsys):
    # the diffusers folder, then Lightricks' combined file + a Gemma-3 folder: the same clip and sound
    args = [
        "--backbone",
        "ltx2",
        "--prompt",
        "a red circle",
        "--frames",
        "9",
        "--size",
        "64",
        "--steps",
        "2",
        "--fps",
        "12",
        "--audio",
    ]
    sample.main(args + ["--weights", str(repo.root), "--out", str(tmp_path / "clip.webp")])
    with Image.open(tmp_path / "clip.webp") as im:
        assert im.format == "WEBP" and im.n_frames == 9 and im.size == (64, 64)
        im.load()
        assert im.info.get("duration") == round(1000 / 12)  # played at --fps
    params, pcm = read_wav(tmp_path / "clip.wav")  # 19 latent frames (0.75 s x 25) -> 73 mel frames -> 40 each
    assert params == (2, 2, 24000, 73 * 40) and np.frombuffer(pcm, "<i2").std() > 30  # stereo 16 bit, not silence

    gemma_dir = tmp_path / "gemma"
    repo.gemma.save_pretrained(gemma_dir)
    repo.tok.save_pretrained(gemma_dir)
    file = combined_file(repo, tmp_path / "ltx-2-tiny.safetensors")
    sample.main(args + ["--weights", file, "--text-encoders", str(gemma_dir), "--out", str(tmp_path / "c.webp")])
    # the same up to float rounding (the same weights, laid out differently in memory): frames through lossy WebP,
    # 16-bit samples
    (_, fa), (_, fb) = frames_of(tmp_path / "clip.webp"), frames_of(tmp_path / "c.webp")
    assert (
        len(fa) == len(fb) == 9
        and max(np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(fa, fb)) < 0.5
    )
    wa, wb = (np.frombuffer(read_wav(tmp_path / f)[1], "<i2") for f in ("clip.wav", "c.wav"))
    assert wa.shape == wb.shape and np.abs(wa.astype(int) - wb).max() <= 2
    with pytest.raises(SystemExit):  # a single file needs the text encoder from elsewhere
        sample.main(args + ["--weights", file, "--out", str(tmp_path / "x.webp")])
    assert "--weights is a single file: pass --text-encoders" in capsys.readouterr().err


def test_train_full_size_path_and_its_run(repo, tmp_path, monkeypatch):
    # train.py --weights on the tiny diffusers folder (full_setup: prompts encoded by Gemma-3 + connectors, which are
    # freed before the transformer loads; rollouts decoded by the video VAE, each frame scored), then sample.py --run
    import gc
    import weakref

    import train

    encoders, order = [], []
    text_encoder, load_net = sample.ltx2_text_encoder, sample.load_net

    def spy_text_encoder(*a, **k):
        enc = text_encoder(*a, **k)
        encoders.append(weakref.ref(enc))
        order.append("text encoder")
        return enc

    def spy_load_net(*a, **k):
        gc.collect()
        order.append("transformer" + (" beside a live text encoder" if any(r() for r in encoders) else ""))
        return load_net(*a, **k)

    monkeypatch.setattr(sample, "ltx2_text_encoder", spy_text_encoder)
    monkeypatch.setattr(sample, "load_net", spy_load_net)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue ring\n")
    res = train.main(
        [
            "--backbone",
            "ltx2",
            "--weights",
            str(repo.root),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--rewards",
            "tiny_photo,tiny_sketch",
            "--size",
            "64",
            "--frames",
            "9",
            "--steps",
            "1",
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
            "--batch",
            "2",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert order == ["text encoder", "transformer"]
    assert len(res["sweep"]) == 3 and all(np.isfinite(s["rewards"]).all() for s in res["sweep"])
    with Image.open(tmp_path / "run" / "slider.png") as im:  # rows: 2 prompts x 9 frames; columns: 3 points
        assert im.height >= 18 * 96 and im.width >= 3 * 96
    monkeypatch.undo()
    sample.main(
        [
            "--run",
            str(tmp_path / "run"),
            "--prompt",
            "a red circle",
            "--pref",
            "0.3",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "clip.webp"),
        ]
    )
    with Image.open(tmp_path / "clip.webp") as im:
        assert im.n_frames == 9 and im.size == (64, 64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # a finished tiny run as train.py leaves it: the cached pixel-space base (combined-file format with metadata), an
    # adapter recording the loader spec, and config.json with the sampling settings (5 frames of 16 px)
    d = tmp_path_factory.mktemp("ltx2_run")
    spec = dict(pixels=4, tiny_text_encoder=dict(vocab=VOCAB, seed=0))
    enc = sample.tiny_ltx2_text_encoder(**spec["tiny_text_encoder"])
    cfg = replace(
        model.LTX2Config(**model.LTX2_PRESETS["ltx2-tiny"]),
        in_channels=48,
        caption_channels=enc.connectors.cfg.caption_channels,
    )
    torch.manual_seed(0)
    base = model.LTX2Transformer(cfg)
    save_file(
        {k: v.contiguous() for k, v in base.state_dict().items()},
        d / "base.safetensors",
        metadata=model.ltx2_file_metadata(cfg),
    )
    net = model.load_transformer(d / "base.safetensors", pref_dim=2)
    model.add_lora(net, rank=2, alpha=4)
    with torch.no_grad():  # random LoRA and preference weights, so that ω visibly matters
        for p in model.adapter_state(net).values():
            p.copy_(torch.randn_like(p) * 0.3)
    spec["weights"] = str(d / "base.safetensors")
    model.save_adapters(
        net,
        str(d / "adapters.safetensors"),
        objectives=["tiny_photo", "tiny_sketch"],
        extra={"pipeline": json.dumps(spec)},
    )
    (d / "config.json").write_text(
        json.dumps(dict(backbone="ltx2", sample_steps=2, solver="euler", shift=3.0, size=16, dtype="fp32", frames=5))
    )
    return d


def test_cli_tiny_run_webp_and_gif(run_dir, tmp_path):
    for ext in ("webp", "gif"):
        out = tmp_path / f"clip.{ext}"
        sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--pref", "0.3", "--out", str(out)])
        fmt, frames = frames_of(out)
        assert fmt == ext.upper() and len(frames) == 5 and frames[0].size == (16, 16)
        assert len({f.tobytes() for f in frames}) > 1  # it moves


def test_cli_tiny_run_sweep_strip(run_dir, tmp_path):
    out = tmp_path / "strip.webp"
    sample.main(["--run", str(run_dir), "--prompt", "a red circle", "--sweep", "3", "--out", str(out)])
    _, frames = frames_of(out)
    assert len(frames) == 5 and frames[0].width == 3 * 160  # 16 px tiles enlarged 10x, labels in a band above
    band = frames[0].height - 160
    tiles = [frames[2].crop((160 * i, band + 8, 160 * (i + 1), band + 152)) for i in range(3)]
    diffs = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(tiles, tiles[1:])]
    assert min(diffs) > 2  # ω changes the clip (beyond lossy-coding noise)
    assert np.asarray(frames[0].crop((0, 0, 480, band))).std() > 5  # the ω labels


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "10"], "--frames 10: ltx2 needs 8k+1 frames"),
        (["--size", "48"], "--size 48: ltx2 needs a positive multiple of 32"),
        (["--out", "clip.png"], "a video is written as an animated .webp or .gif"),
        (["--fps", "0"], "--fps 0.0: must be a finite number > 0"),
        (["--fps", "inf"], "--fps inf: must be a finite number > 0"),
        (["--backbone", "sd35", "--frames", "9"], "--frames is for videos; backbone 'sd35' does not use it"),
        (["--backbone", "sd35", "--audio"], "--audio is for videos; backbone 'sd35' does not use it"),
    ],
)
def test_cli_bad_input(repo, tmp_path, capsys, args, message):
    # all refused before anything loads (the weights here are an empty folder)
    opts = {
        "--backbone": "ltx2",
        "--weights": str(tmp_path),
        "--prompt": "a red ring",
        "--out": "clip.webp",
        **dict(zip(args[::2], args[1::2])),
    }
    opts["--out"] = str(tmp_path / opts["--out"])
    flags = [a for a in args if a.startswith("--") and a not in opts]
    with pytest.raises(SystemExit) as e:
        sample.main([s for kv in opts.items() for s in kv] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_tiny_run_refuses_audio(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(
            ["--run", str(run_dir), "--prompt", "a", "--pref", "0.3", "--audio", "--out", str(tmp_path / "x.webp")]
        )
    assert "the tiny LTX-2 has no audio VAE or vocoder" in capsys.readouterr().err


def test_serve_renders_animated_webp(run_dir):
    args = sample.cli().parse_args(["--run", str(run_dir), "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    assert slider.info["video"] and slider.mime == "image/webp"
    body, cache = slider.render("a red circle", 3, [0.5, 0.5])
    assert cache == "miss" and body[:4] == b"RIFF" and body[8:12] == b"WEBP"
    with Image.open(io.BytesIO(body)) as im:
        assert im.n_frames == 5 and im.size == (16, 16)
    assert slider.render("a red circle", 3, [0.5, 0.5]) == (body, "hit")


def test_save_video_mp4_where_pyav_is_installed(tmp_path):
    import av  # a dev requirement: sample.py writes the MP4 where PyAV is installed

    clip = torch.rand(9, 3, 33, 47, generator=torch.Generator().manual_seed(0))  # odd sides: padded to even for 4:2:0
    paths = sample.save_video(clip, str(tmp_path / "c.webp"), 12.0)
    assert paths == [str(tmp_path / "c.webp"), str(tmp_path / "c.mp4")]
    with av.open(str(tmp_path / "c.mp4")) as c:
        frames = list(c.decode(video=0))
        assert len(frames) == 9 and (frames[0].width, frames[0].height) == (48, 34)
        assert c.streams.video[0].average_rate == 12


def test_serve_page_plays_the_clip_in_a_browser(run_dir, tmp_path):
    # issue 24: an LTX-2 run's page plays the clip at the current w (an animated WebP in the page's <img>) and shows
    # the sweep as clips; in real headless Chromium, screenshots of the clip taken 37 ms apart differ: it plays
    import threading
    import time

    from test_serve import DevTools, browser_page, chromium

    args = sample.cli().parse_args(["--run", str(run_dir), "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    srv = sample.make_server(slider, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    dt = DevTools(chromium(), tmp_path / "profile")
    try:
        s, js, wait = browser_page(dt, f"http://127.0.0.1:{srv.server_address[1]}/")
        wait("document.getElementById('img').complete && document.getElementById('img').naturalWidth", "the clip")
        wait("document.querySelectorAll('#strip img[src]').length === 7", "the sweep's clips")
        kinds = (
            "Promise.all([...document.querySelectorAll('#img, #strip img')].map(i => fetch(i.src).then(r => r.blob())))"
        )
        assert set(js(kinds + ".then(bs => bs.map(b => b.type))")) == {"image/webp"}  # the clip and 7 sweep clips
        # a canvas draws an animated image's first frame (HTML spec), so the screen is what shows it playing
        box = json.loads(js("JSON.stringify(document.getElementById('img').getBoundingClientRect())"))
        clip = dict(x=box["left"], y=box["top"], width=box["width"], height=box["height"], scale=1)
        frames = []
        for _ in range(16):
            frames.append(dt.send("Page.captureScreenshot", s, format="png", clip=clip)["data"])
            time.sleep(0.037)
        assert len(frames) == 16 and len(set(frames)) >= 3  # 5 frames at the run's fps, looping: several seen
    finally:
        dt.close()
        srv.shutdown()
        srv.server_close()
