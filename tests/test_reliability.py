"""What the code promises on bad input and on a crash (README "Failures"): a broken reward or a non-finite loss
stops the run before any weight changes, with the last checkpoint intact and resumable; a run folder is never
clobbered; --resume is strict and early; bad flags and misplaced files are one line and exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import model
import rewards as R
import sample
import train
from test_train import ROOT, TINY


def run(tmp_path, *extra, name="run"):
    return train.main(TINY + ["--out", str(tmp_path / name), "--cache", str(tmp_path / "cache"), *extra])


def fails(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def poison(monkeypatch):
    # a reward that is healthy until `state["bad_from"]` calls, then NaN for one sample of each batch
    state = dict(calls=0, bad_from=10**9)

    def tiny_poison(images, prompts, meta):
        r = R.tiny_sketch(images, prompts, meta)
        state["calls"] += 1
        if state["calls"] > state["bad_from"]:
            r = r.clone()
            r[1] = float("nan")
        return r

    monkeypatch.setitem(R.OFFLINE, "tiny_poison", tiny_poison)
    monkeypatch.setitem(R.REWARDS, "tiny_poison", tiny_poison)
    return state


def test_nan_reward_stops_cleanly_last_checkpoint_intact_and_resumable(tmp_path, capsys, poison):
    args = ["--rewards", "tiny_photo,tiny_poison", "--ckpt-every", "1"]
    run(tmp_path, "--steps", "3", *args, name="straight")  # healthy reference
    poison.update(calls=0, bad_from=2)  # step 1 scores twice (two micro-batches of 4), then step 2 is poisoned
    err = fails(capsys, run, tmp_path, "--steps", "3", *args)
    assert "step 2: reward tiny_poison returned non-finite scores for 1 sample(s): #1" in err and "nan" in err
    d = tmp_path / "run"
    ck = load_file(d / "checkpoint.safetensors")
    assert all(torch.isfinite(v).all() for v in ck.values() if v.is_floating_point())
    assert model.read_safetensors_meta(str(d / "checkpoint.safetensors"))["step"] == "1"
    assert not (d / "eval.json").exists()  # no evaluation of a broken run
    poison.update(bad_from=10**9)  # the reward is fixed: the run resumes where it stopped and ends as the straight one
    train.main(["--resume", str(d)])
    a, b = load_file(d / "checkpoint.safetensors"), load_file(tmp_path / "straight" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a if a[k].is_floating_point())
    ev = json.loads((d / "eval.json").read_text())  # strict JSON: no NaN literal anywhere
    json.loads((d / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert ev["sweep"]


def test_reward_of_the_wrong_shape_is_named(tmp_path, capsys, monkeypatch):
    bad = lambda images, prompts, meta: torch.zeros(len(prompts), 2)
    monkeypatch.setitem(R.OFFLINE, "tiny_wide", bad)
    monkeypatch.setitem(R.REWARDS, "tiny_wide", bad)
    err = fails(capsys, run, tmp_path, "--steps", "1", "--rewards", "tiny_photo,tiny_wide")
    assert (
        "step 1: reward tiny_wide returned a torch.float32 tensor of shape [4, 2], not a float tensor of shape [4]"
        in err
    )


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--steps", "1")
    before = load_file(tmp_path / "run" / "checkpoint.safetensors")
    nft = train.nft_loss
    monkeypatch.setattr(train, "nft_loss", lambda *a, **k: nft(*a, **k) * float("nan"))
    err = fails(capsys, train.main, ["--resume", str(tmp_path / "run"), "--steps", "2"])
    assert "step 2: non-finite loss or gradient" in err and "intact at its last checkpoint (step 1)" in err
    after = load_file(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_folder_is_never_clobbered(tmp_path, capsys):
    run(tmp_path, "--steps", "1")
    stamp = (tmp_path / "run" / "checkpoint.safetensors").stat().st_mtime_ns
    err = fails(capsys, run, tmp_path, "--steps", "1")
    assert f"--out {tmp_path / 'run'} already holds a run: continue it with --resume" in err
    assert (tmp_path / "run" / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    # the preset's default folder moves on to a fresh one and says so
    assert train.claim_run_folder(str(tmp_path / "run"), explicit=False) == str(tmp_path / "run-2")
    assert "writes to" in capsys.readouterr().out
    assert train.claim_run_folder(str(tmp_path / "fresh"), explicit=True) == str(tmp_path / "fresh")


def test_resume_is_strict_and_early(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    (d / "checkpoint.safetensors.tmp9999999").write_bytes(b"half a checkpoint")  # a save killed by kill -9
    (tmp_path / "cache" / "base.safetensors.tmp9999999").write_bytes(b"half a base")  # a killed pretraining's save
    (tmp_path / "cache" / f"base.safetensors.tmp{os.getppid()}").write_bytes(b"a live process's")  # being written
    err = fails(capsys, train.main, ["--resume", str(d), "--lr", "0.001", "--rewards", "tiny_photo,tiny_prompt"])
    assert "these flags would change the run" in err and "--lr 0.001 (the run has 0.0003)" in err
    assert "--rewards 'tiny_photo,tiny_prompt' (the run has 'tiny_photo,tiny_sketch')" in err
    # already at the last step: said, then evaluated again; evaluation-only flags may change; temporaries go
    train.main(["--resume", str(d), "--eval-points", "2"])
    assert "already at step 1 of 1" in capsys.readouterr().out
    assert len(json.loads((d / "eval.json").read_text())["sweep"]) == 2
    assert not (d / "checkpoint.safetensors.tmp9999999").exists()
    assert not (tmp_path / "cache" / "base.safetensors.tmp9999999").exists()
    assert (tmp_path / "cache" / f"base.safetensors.tmp{os.getppid()}").exists()  # another process's: kept
    assert json.loads((d / "config.json").read_text())["eval_points"] == 2
    # a corrupt checkpoint is found before any model is built (the setup would pretrain or load the base)
    monkeypatch.setitem(train.BACKBONES["sd35"], "tiny_setup", lambda *a: pytest.fail("setup ran"))
    (d / "checkpoint.safetensors").write_bytes(b"\x00" * 64)
    err = fails(capsys, train.main, ["--resume", str(d)])
    assert "cannot read the checkpoint" in err and "checkpoint.safetensors" in err
    os.remove(d / "checkpoint.safetensors")
    monkeypatch.undo()
    train.main(["--resume", str(d), "--steps", "1"])
    assert "no checkpoint yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag,value,msg",
    [
        ("--batch", "0", "--batch 0: must be >= 1"),
        ("--ckpt-every", "0", "--ckpt-every 0: must be >= 1"),
        ("--eval-points", "1", "--eval-points 1: must be >= 2"),
        ("--group-size", "1", "--group-size 1: must be >= 2"),
        ("--lr", "-1", "--lr -1.0: must be > 0"),
        ("--beta", "2", "--beta 2.0: must be > 0 and <= 1.0"),
        ("--lr", "nan", "--lr nan: must be a finite number"),
        ("--steps", "-3", "--steps -3: must be >= 1"),
        ("--lr", "inf", "--lr inf: must be a finite number"),
        ("--kl-beta", "inf", "--kl-beta inf: must be a finite"),
        ("--shift", "-1", "--shift -1.0: must be > 0"),
        ("--seed", "99999999999", "--seed 99999999999: must be in [0, 2^31)"),
        ("--size", "33", "--size 33: the tiny sd35 needs a multiple of 4"),
        ("--size", "64", "at most 32"),
    ],
)
def test_numeric_flags_are_range_checked(tmp_path, capsys, flag, value, msg):
    t0 = time.time()
    assert msg in fails(capsys, run, tmp_path, "--steps", "1", flag, value)
    assert time.time() - t0 < 5 and not (tmp_path / "run").exists()  # before anything loads or is written


def test_full_size_inputs_fail_before_loading(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "w").mkdir()
    base = ["--backbone", "sd35", "--device", "cpu", "--out", str(tmp_path / "x")]
    err = fails(capsys, train.main, base + ["--weights", str(tmp_path / "w"), "--prompts", str(tmp_path / "empty.txt")])
    assert "the file has no prompt" in err
    err = fails(capsys, train.main, base + ["--weights", "stabilityai/stable-diffusion-3.5-medium"])
    assert "no such file or folder (a hub id? weights are never downloaded here" in err
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device" in fails(capsys, train.main, TINY + ["--device", "cuda"])


def test_misplaced_files_are_named(tmp_path, capsys):
    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    with pytest.raises(ValueError, match="it is a train.py checkpoint"):
        model.read_adapter_meta(str(d / "checkpoint.safetensors"))
    with pytest.raises(ValueError, match="it is a ParetoSlider adapter.*--lora"):
        model.load_transformer(str(d / "adapters.safetensors"))
    net = model.SD3Transformer(model.SD3Config(**model.SD3_PRESETS["sd35-tiny"], pref_dim=2))
    model.add_lora(net, 2, 4)
    model.export_lora_diffusers(net, str(tmp_path / "export.safetensors"))
    with pytest.raises(ValueError, match="it is a LoRA exported for diffusers"):
        model.read_adapter_meta(str(tmp_path / "export.safetensors"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: malformed JSON"):
        model.read_json(str(tmp_path / "bad.json"))
    # sample.py: a preference model is never sampled without w (that mode was never trained)
    for extra in ([], ["--pref", ""], ["--sweep", "0"]):
        err = fails(
            capsys, sample.main, ["--run", str(d), "--prompt", "a red circle", "--out", str(tmp_path / "o.png"), *extra]
        )
        assert "trained with a preference over 2 objectives" in err or "--pref is empty" in err or "N from 2" in err
    err = fails(
        capsys,
        sample.main,
        [
            "--run",
            str(d),
            "--prompt",
            "a",
            "--pref",
            "0.5",
            "--lora",
            str(d / "checkpoint.safetensors"),
            "--out",
            str(tmp_path / "o.png"),
        ],
    )
    assert "it is a train.py checkpoint" in err
    assert not (tmp_path / "o.png").exists()


def test_atomic_json_refuses_nan_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        model.atomic_json({"hypervolume": float("nan")}, str(tmp_path / "eval.json"))
    assert os.listdir(tmp_path) == []


def test_kill_9_mid_run_resumes_exactly(tmp_path):
    # kill -9 while training (after the first checkpoint): --resume finishes the run as if nothing happened
    # both runs on the PyTorch kernels: this process's backend may have been switched by an earlier test; on a
    # cosine lr schedule, so the resumed steps must also take the lr of their step, not of a schedule begun anew
    more = ["--ckpt-every", "1", "--steps", "3", "--kernels", "torch", "--lr-schedule", "cosine"]
    args = TINY + ["--cache", str(tmp_path / "cache"), *more]
    run(tmp_path, *more, name="straight")
    p = subprocess.Popen(
        [sys.executable, "train.py", *args, "--out", str(tmp_path / "run")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ck = tmp_path / "run" / "checkpoint.safetensors"
    deadline = time.time() + 240
    while not ck.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    train.main(["--resume", str(tmp_path / "run")])
    a, b = load_file(ck), load_file(tmp_path / "straight" / "checkpoint.safetensors")
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a if a[k].is_floating_point())


# ----------------------------------------------------------------------------------------------------------------
# Second round (nothing silent, nothing lost): one test per class of input that used to pass silently or be lost


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    # each names the flag and what makes it meaningless; nothing is written
    for extra, msg in [
        (["--frames", "9"], "--frames: --backbone sd35 makes images"),
        (["--nft-audio"], "--nft-audio: --backbone sd35 has no audio"),
        (["--guidance", "3"], "--guidance: --backbone sd35 is not guidance-distilled"),
        (["--edits", "e.jsonl"], "--edits: --tiny draws its edits from its world"),
        (["--prompts", "p.txt"], "--prompts: --tiny draws its prompts from its world"),
        (["--weights", "w"], "--weights: --tiny builds and pretrains its own base"),
        (["--rewards", "tiny_photo,tiny_photo"], "named twice"),
        (["--heldout", "tiny_sketch"], "['tiny_sketch'] named twice"),
    ]:
        assert msg in fails(capsys, run, tmp_path, "--steps", "1", *extra), extra
    assert not (tmp_path / "run").exists()
    err = fails(
        capsys,
        train.main,
        [
            "--backbone",
            "flux-kontext",
            "--weights",
            str(tmp_path),
            "--prompts",
            "p.txt",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "--prompts: --backbone flux-kontext edits: --edits" in err
    (tmp_path / "file").write_text("")
    assert "--out " + str(tmp_path / "file") + ": a file, not a folder" in fails(
        capsys, train.main, TINY + ["--out", str(tmp_path / "file")]
    )


def test_non_finite_checkpoint_is_never_resumed_nor_saved(tmp_path, capsys):
    # a NaN in the EMA (or the old policy, or a moment) used to load unchecked and be saved again
    from safetensors.torch import save_file

    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    path = d / "checkpoint.safetensors"
    sd, meta = model.read_safetensors(str(path))
    key = next(k for k in sd if k.startswith("ema.pref_mlp"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(path), metadata=meta)
    err = fails(capsys, train.main, ["--resume", str(d), "--steps", "2"])
    assert f"non-finite values in {key}" in err and "checkpoint.safetensors" in err and "cannot be resumed" in err
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p])
    with pytest.raises(train.RunError, match="non-finite values in old.w"):
        train.save_checkpoint(
            str(tmp_path / "c.safetensors"),
            1,
            {"w": p},
            {"w": torch.tensor([1.0, float("inf")])},
            {"w": p.detach()},
            opt,
            torch.Generator(),
            train.Config(),
        )
    assert not (tmp_path / "c.safetensors").exists()


def test_resume_fills_a_lacking_key_from_the_runs_preset_or_refuses(tmp_path, capsys):
    # a hand-edited config.json: a key the tiny preset gives comes from there (kl_beta 0.1, not the general 1e-4);
    # another is refused; a value of the wrong type is refused
    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    saved = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "kl_beta"}))
    assert train.parse_config(["--resume", str(d)]).kl_beta == 0.1
    # a config from before --advantage, --corners and --lr-schedule ran what the flags' first values do, not the
    # tiny preset's later early / 0.3
    (d / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in train.SINCE}))
    cfg = train.parse_config(["--resume", str(d)])
    assert (saved["advantage"], saved["corners"]) == ("early", 0.3)  # the tiny preset now
    assert (cfg.advantage, cfg.corners, cfg.lr_schedule) == ("paper", 0.1, "constant")
    (d / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "beta"}))
    assert "lacks beta" in fails(capsys, train.parse_config, ["--resume", str(d)])
    (d / "config.json").write_text(json.dumps(dict(saved, steps="many")))
    assert "steps = 'many'" in fails(capsys, train.parse_config, ["--resume", str(d)])
    (d / "config.json").write_text(json.dumps(dict(saved, lr=float("nan"))))  # json.dumps writes NaN
    assert "--lr nan: must be a finite number" in fails(capsys, train.parse_config, ["--resume", str(d)])


def test_a_reward_that_raises_is_named_with_its_step(tmp_path, capsys, monkeypatch):
    def broken(images, prompts, meta):
        raise RuntimeError("the judge's server is down")

    monkeypatch.setitem(R.OFFLINE, "tiny_broken", broken)
    monkeypatch.setitem(R.REWARDS, "tiny_broken", broken)
    err = fails(capsys, run, tmp_path, "--steps", "1", "--rewards", "tiny_photo,tiny_broken")
    assert "step 1: reward tiny_broken failed: RuntimeError: the judge's server is down" in err


def test_sample_values_are_checked_wherever_they_come_from(tmp_path, capsys):
    # flags and the run's config.json alike; a lacking key must be given; all before anything loads
    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    base = ["--run", str(d), "--prompt", "a red circle", "--pref", "0.5", "--out", str(tmp_path / "o.png")]
    for extra, msg in [
        (["--steps", "0"], "--steps 0: must be an integer from 1 to 10000"),
        (["--shift", "0"], "--shift 0.0: must be a finite number > 0"),
        (["--guidance", "nan"], "--guidance nan: must be a finite number > 0"),
        (["--guidance", "-5"], "--guidance -5.0: must be a finite number > 0"),
        (["--seed", "-1"], "--seed -1: must be an integer in [0, 2^31)"),
        (["--size", "30"], "sd35 needs a positive multiple of 4"),
        (["--size", "64"], "at most 32"),
        (["--backbone", "sd35"], "--backbone: --run"),
        (["--vae", "ae.safetensors"], "--vae: --run"),
        (["--negative-prompt", "blurry"], "--negative-prompt is the unconditional half"),
        (["--frames", "9"], "--frames is for videos"),
        (["--port", "9000"], "--port is for --serve"),
        (["--out", str(tmp_path / "o.txt")], "not an image file name"),
    ]:
        assert msg in fails(capsys, sample.main, base + extra), extra
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, sample_steps=0)))
    assert f"{d / 'config.json'}: sample_steps = 0: must be an integer" in fails(capsys, sample.main, base)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "shift"}))
    assert "lacks shift (--shift)" in fails(capsys, sample.main, base)
    sample.main(base + ["--shift", "1.0"])  # given as a flag, it samples
    assert (tmp_path / "o.png").stat().st_size > 0


def test_sample_refuses_a_nan_adapter_and_another_backbones(tmp_path, capsys):
    from safetensors.torch import save_file

    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    base = ["--run", str(d), "--prompt", "a", "--pref", "0.5", "--out", str(tmp_path / "o.png")]
    sd, meta = model.read_safetensors(str(d / "adapters.safetensors"))
    k = next(iter(sd))
    bad = dict(sd, **{k: torch.full_like(sd[k], float("nan"))})
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    assert f"non-finite values in {k}" in fails(
        capsys, sample.main, base + ["--lora", str(tmp_path / "nan.safetensors")]
    )
    save_file(sd, str(tmp_path / "flux.safetensors"), metadata=dict(meta, backbone="flux-kontext"))
    err = fails(capsys, sample.main, base + ["--lora", str(tmp_path / "flux.safetensors")])
    assert "an adapter of backbone 'flux-kontext'; --run" in err and "is 'sd35'" in err
    assert not (tmp_path / "o.png").exists()


def test_sample_never_destroys_an_output_on_a_failed_write(tmp_path, capsys, monkeypatch):
    # a full disk (an injected ENOSPC after half the bytes): the earlier image survives, byte for byte, no temporary
    # is left, and the message names the file; a non-image and a decompression bomb as --image are one line each
    from PIL import Image

    d = tmp_path / "run"
    run(tmp_path, "--steps", "1")
    out = tmp_path / "o.png"
    base = ["--run", str(d), "--prompt", "a red circle", "--pref", "0.5", "--out", str(out)]
    sample.main(base)
    good = out.read_bytes()
    save = Image.Image.save

    def full_disk(self, fp, *a, **k):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    err = fails(capsys, sample.main, base + ["--seed", "1"])
    assert f"{out}: could not write it (No space left on device); any earlier file of that name is intact" in err
    assert out.read_bytes() == good and sorted(os.listdir(tmp_path)) == sorted(["o.png", "run", "cache"])
    monkeypatch.setattr(Image.Image, "save", save)
    (tmp_path / "o.png.tmp9999999").write_bytes(b"left by kill -9")
    sample.main(base + ["--seed", "2"])
    assert out.read_bytes() != good and not (tmp_path / "o.png.tmp9999999").exists()
    (tmp_path / "text.png").write_text("not an image")
    flux = ["--prompt", "make it blue", "--pref", "0.5", "--out", str(tmp_path / "e.png")]
    train.main(
        [
            "--backbone",
            "flux-kontext",
            "--tiny",
            *TINY[3:],
            "--steps",
            "1",
            "--out",
            str(tmp_path / "fx"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    err = fails(capsys, sample.main, ["--run", str(tmp_path / "fx"), "--image", str(tmp_path / "text.png"), *flux])
    assert "not an image this program can read" in err and "Traceback" not in err
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 MP of 1-bit pixels: 1 MB on disk
    err = fails(capsys, sample.main, ["--run", str(tmp_path / "fx"), "--image", str(tmp_path / "bomb.png"), *flux])
    assert "9000x9000 pixels, more than" in err
    err = fails(
        capsys,
        sample.main,
        [
            "--run",
            str(d),
            "--image",
            str(tmp_path / "text.png"),
            "--prompt",
            "a",
            "--pref",
            "0.5",
            "--out",
            str(tmp_path / "e.png"),
        ],
    )
    assert "--image is for a source to edit; --run" in err
