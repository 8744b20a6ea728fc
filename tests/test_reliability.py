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
    assert "step 1: reward tiny_wide returned a torch.float32 tensor of shape [4, 2], not a float tensor of shape [4]" in err


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
    (d / "checkpoint.safetensors.tmp4242").write_bytes(b"half a checkpoint")  # a save killed by kill -9
    err = fails(capsys, train.main, ["--resume", str(d), "--lr", "0.001", "--rewards", "tiny_photo,tiny_prompt"])
    assert "these flags would change the run" in err and "--lr 0.001 (the run has 0.0003)" in err
    assert "--rewards 'tiny_photo,tiny_prompt' (the run has 'tiny_photo,tiny_sketch')" in err
    # already at the last step: said, then evaluated again; evaluation-only flags may change; temporaries go
    train.main(["--resume", str(d), "--eval-points", "2"])
    assert "already at step 1 of 1" in capsys.readouterr().out
    assert len(json.loads((d / "eval.json").read_text())["sweep"]) == 2
    assert not (d / "checkpoint.safetensors.tmp4242").exists()
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


@pytest.mark.parametrize("flag,value,msg", [
    ("--batch", "0", "--batch 0: must be >= 1"), ("--ckpt-every", "0", "--ckpt-every 0: must be >= 1"),
    ("--eval-points", "1", "--eval-points 1: must be >= 2"), ("--group-size", "1", "--group-size 1: must be >= 2"),
    ("--lr", "-1", "--lr -1.0: must be > 0"), ("--beta", "2", "--beta 2.0: must be > 0 and <= 1.0"),
    ("--lr", "nan", "--lr nan: must be > 0"), ("--steps", "-3", "--steps -3: must be >= 1"),
])
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
        err = fails(capsys, sample.main, ["--run", str(d), "--prompt", "a red circle", "--out", str(tmp_path / "o.png"),
                                         *extra])
        assert "trained with a preference over 2 objectives" in err or "--pref is empty" in err or "N >= 2" in err
    err = fails(capsys, sample.main, ["--run", str(d), "--prompt", "a", "--pref", "0.5", "--lora",
                                      str(d / "checkpoint.safetensors"), "--out", str(tmp_path / "o.png")])
    assert "it is a train.py checkpoint" in err
    assert not (tmp_path / "o.png").exists()


def test_atomic_json_refuses_nan_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        model.atomic_json({"hypervolume": float("nan")}, str(tmp_path / "eval.json"))
    assert os.listdir(tmp_path) == []


def test_kill_9_mid_run_resumes_exactly(tmp_path):
    # kill -9 while training (after the first checkpoint): --resume finishes the run as if nothing happened
    # both runs on the PyTorch kernels: this process's backend may have been switched by an earlier test
    args = TINY + ["--cache", str(tmp_path / "cache"), "--ckpt-every", "1", "--steps", "3", "--kernels", "torch"]
    run(tmp_path, "--steps", "3", "--ckpt-every", "1", "--kernels", "torch", name="straight")
    p = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(tmp_path / "run")], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "run" / "checkpoint.safetensors"
    deadline = time.time() + 240
    while not ck.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    train.main(["--resume", str(tmp_path / "run")])
    a, b = load_file(ck), load_file(tmp_path / "straight" / "checkpoint.safetensors")
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a if a[k].is_floating_point())
