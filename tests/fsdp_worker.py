"""Run by tests/test_distributed.py under torchrun (gloo, CPU): FSDP2 facts checked on every rank, printed as one JSON
line per rank ("fsdp-result {...}").

    velocities: the old policy, the reference (adapters off) and the EMA swapped into a sharded net give the
                velocities of the same states in an unsharded copy (train.policy's in-place exchange reaches FSDP).
    load DIR:   a diffusers transformer folder loaded lazily and materialised sharded: the net equals the eager load,
                and this rank read about 1/N of the checkpoint's bytes."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

import model
import train


def adapted_pair():
    # an unsharded net and a sharded copy, with the same random adapters (not the identity init) and states
    torch.manual_seed(0)
    one = model.SD3Transformer(model.SD3Config(**model.SD3_PRESETS["sd35-tiny"]))
    model.add_preference(one, 2)
    model.add_lora(one, 4, 8)
    with torch.no_grad():
        for p in model.adapter_state(one).values():
            p.add_(torch.randn_like(p) * 0.05)
    states = [{n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.adapter_state(one).items()} for _ in "ab"]
    sharded = model.SD3Transformer(one.cfg)
    model.add_lora(sharded, 4, 8)
    sharded.load_state_dict(one.state_dict())
    train.shard(sharded)
    live = model.adapter_state(sharded)
    shard_states = [{n: model.like(live[n], v.clone()) for n, v in st.items()} for st in states]
    return one, sharded, states, shard_states


def velocities():
    one, sharded, (old, ema), (old_s, ema_s) = adapted_pair()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, generator=g)
    cond = dict(context=torch.randn(2, 6, 64, generator=g), pooled=torch.randn(2, 64, generator=g))
    w = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    out = {}
    with torch.no_grad():
        for name, a, b, pref in (("old", old, old_s, w), ("reference", None, None, None), ("ema", ema, ema_s, w)):
            with train.policy(one, a):
                v1 = one(x, sigma, pref=pref, **cond)
            with train.policy(sharded, b):
                v2 = sharded(x, sigma, pref=pref, **cond)
            out[name] = (v1 - v2).abs().max().item()
        out["live_after"] = (one(x, sigma, pref=w, **cond) - sharded(x, sigma, pref=w, **cond)).abs().max().item()
    out["states_differ"] = (one(x, sigma, pref=w, **cond) - v1).abs().max().item()  # the EMA is another policy
    return out


def load(folder):
    eager = model.load_transformer(folder)
    lazy = model.load_transformer(folder, lazy=True)
    total = sum(t.numel() * t.element_size() for t in eager.state_dict().values())
    model.Lazy.bytes_read = 0
    model.materialise(lazy, "cpu", train.shard)
    read = model.Lazy.bytes_read
    sd = {k: model.full(v) for k, v in lazy.state_dict().items()}
    diff = max((sd[k].float() - v.float()).abs().max().item() for k, v in eager.state_dict().items())
    return dict(read=read, total=total, diff=diff, sharded=sum(isinstance(p, model.DTensor) for p in lazy.parameters()))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = velocities() if sys.argv[1] == "velocities" else load(sys.argv[2])
    print("fsdp-result " + json.dumps(dict(result, rank=dist.get_rank())), flush=True)
    train.compute_cleanup()  # as train.py ends
    train.compute_exit()
