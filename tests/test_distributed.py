"""train.py under torchrun (2 gloo processes on the CPU): replicated (DDP-style) and sharded (--fsdp), against one
process; checkpoints that move between the two; FSDP's policy swaps and its sharded loading."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import train
from test_train import ROOT, TINY
from tiny_repos import flux_repo, sd35_repo

ARGS = TINY + ["--steps", "2", "--group-size", "3"]  # 2 prompts x 2 w x 3 = 12 samples: 6 per rank


def torchrun(*args, n=2):
    with socket.socket() as s:  # a free port: two test runs at once must not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1"]
    p = subprocess.run(
        [*cmd, "--master_port", port, *map(str, args)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"),  # a rank that crashes prints where
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    return p.stdout


def checkpoint(folder):
    return load_file(os.path.join(folder, "checkpoint.safetensors"))


def largest_relative_difference(a, b, prefixes=("policy.", "old.", "ema.")):
    # per tensor ||a - b|| / ||a||, the largest over the adapter tensors (weights, old policy, EMA)
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item() for k in a if k.startswith(prefixes))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run three ways: 2 replicated processes (first, on an empty cache: rank 0 pretrains the base while
    rank 1 waits, then both load it), 2 FSDP processes, 1 process."""
    d = tmp_path_factory.mktemp("dist")
    args = ARGS + ["--cache", d / "cache"]
    out = torchrun("train.py", *args, "--out", d / "ddp")
    assert out.count("tiny base: pretrained, cached in") == 1 and len(os.listdir(d / "cache")) == 1
    torchrun("train.py", *args, "--fsdp", "--out", d / "fsdp")
    train.main([str(a) for a in args] + ["--out", str(d / "one")])
    return d


def test_two_processes_equal_one(runs):
    # rollouts split across ranks, group statistics and gradients summed over ranks -> the same update as one
    # process. Adam moves every weight by about lr = 3e-4 a step whatever the gradient's size, so where a gradient is
    # ~0 the summation order (2 ranks vs 1; the CPU's kernels) decides the step: measured 1.1e-5 on pref_mlp.2 on one
    # x86 CPU, under 1e-5 on CI's. A DDP bug (gradients or group statistics per rank) moves weights by whole steps.
    one, two = checkpoint(runs / "one"), checkpoint(runs / "ddp")
    for k in one:
        if k.startswith(("policy.", "old.", "ema.")):
            assert (one[k] - two[k]).abs().max().item() <= 5e-5, k
    ema = load_file(runs / "one" / "adapters.safetensors")
    lora = [k for k in one if k.startswith("policy.") and ".lora_B" in k]
    assert lora and any((one[k] != ema[k[len("policy.") :]]).any() for k in lora)  # the updates moved the weights
    assert json.loads((runs / "ddp" / "eval.json").read_text())["sweep"]


def test_fsdp_equals_one_process(runs):
    # FSDP2 shards: every tensor gathered in its own dtype, gradients reduce-scattered as sums; the checkpoint is
    # gathered whole by rank 0, the same file as one process's (measured: 4.5e-6 at most, on the optimizer moments)
    one, fsdp = checkpoint(runs / "one"), checkpoint(runs / "fsdp")
    assert largest_relative_difference(one, fsdp) <= 1e-4
    e1, e2 = (json.loads((runs / d / "eval.json").read_text()) for d in ("one", "fsdp"))
    assert e1["hypervolume"] == pytest.approx(e2["hypervolume"], abs=1e-5)
    for a, b in zip(e1["sweep"], e2["sweep"]):
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-5)


def test_checkpoints_resume_across_world_sizes(runs, tmp_path):
    # --fsdp is where a run runs, like --device: a sharded run resumes in one process, a one-process run under
    # torchrun --fsdp, and the two continuations agree (their step-2 checkpoints agree to 4.5e-6 already)
    import shutil

    for d in ("one", "fsdp"):
        shutil.copytree(runs / d, tmp_path / d)
    train.main(["--resume", str(tmp_path / "fsdp"), "--steps", "3"])
    torchrun("train.py", "--resume", tmp_path / "one", "--fsdp", "--steps", "3")
    a, b = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "fsdp")
    assert largest_relative_difference(a, b) <= 1e-4
    assert largest_relative_difference(a, checkpoint(runs / "one")) > 1e-3  # the third step moved them


def worker(*args):
    out = torchrun(os.path.join("tests", "fsdp_worker.py"), *args)
    results = [json.loads(r) for r in re.findall(r"fsdp-result (\{[^{}]*\})", out)]  # (the ranks' lines may interleave)
    assert sorted(r["rank"] for r in results) == [0, 1]
    return results


def test_policies_reach_the_shards():
    # the old policy, the reference (adapters off) and the EMA exchanged into a sharded net give exactly the velocities
    # of an unsharded copy (an exchange FSDP re-gathered over would give the live policy's: 0.38 away)
    for r in worker("velocities"):
        assert r["old"] == r["reference"] == r["ema"] == r["live_after"] == 0.0
        assert r["states_differ"] > 1e-2


@pytest.mark.parametrize("make", [sd35_repo, flux_repo], ids=["sd35", "flux-fused-qkv"])
def test_sharded_loading_reads_one_nth(tmp_path, make):
    # each rank reads its rows of every tensor (a fused qkv's rows from the several diffusers tensors they come from):
    # half the checkpoint's bytes on 2 ranks, plus the replicated position table (sd35: 0.52); the same weights
    make(tmp_path)
    for r in worker("load", tmp_path / "transformer"):
        assert r["diff"] == 0.0 and r["sharded"] > 0
        assert r["read"] <= 0.53 * r["total"], r


def test_fsdp_at_full_size_on_a_tiny_folder(tmp_path):
    # the --weights path under --fsdp: the transformer read lazily and sharded, the text encoders loaded by rank 0
    # alone (its conditioning sent to rank 1), the VAE on each rank
    sd35_repo(tmp_path / "repo")
    flags = "--device cpu --dtype fp32 --rewards tiny_photo,tiny_sketch --size 32 --steps 1 --prompts-per-step 2 "
    flags += "--prefs-per-prompt 2 --group-size 2 --sample-steps 2 --eval-points 2 --eval-prompts 2 --lora-rank 2"
    repo = tmp_path / "repo"
    out = torchrun("train.py", "--backbone", "sd35", "--weights", repo, "--prompts", repo / "prompts.txt",
                   *flags.split(), "--grad-ckpt", "--fsdp", "--out", tmp_path / "run")  # fmt: skip
    assert "step 1/1" in out and (tmp_path / "run" / "adapters.safetensors").is_file()
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert res["eval_prompts"] == ["a red circle", "a blue square"] and len(res["sweep"]) == 2


def test_fsdp_refusals(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for argv, env, message in (
        (["--fsdp"], {}, "--fsdp shards the model over torchrun's processes"),
        (["--fsdp", "--compile"], {"WORLD_SIZE": "2"}, "--fsdp with --compile"),
        (["--fsdp", "--group-size", "3"], {"WORLD_SIZE": "5"}, "must split evenly over the 5 ranks"),
    ):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            train.parse_config(TINY + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
