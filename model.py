"""ParetoSlider networks: our own definitions of the backbones, loading their released weights.

Layout: shared primitives (timestep embedding, LoRA linear, attention, preference modules, the Backbone base
class, checkpoint I/O, loading), then one section per backbone (LTX-2's text connectors in their own section after
it), then the 16-channel VAE, then LTX-2's video VAE, audio VAE and vocoder, then the load table BACKBONES.
Module attribute names ARE the original checkpoint keys (Stability's, BFL's and Lightricks' single files), so an
original file loads by stripping its prefix; a diffusers folder goes through one explicit key-mapping function per
backbone.
Loading is strict: any missing, unexpected or mis-shaped key is an error.

Preference conditioning (ParetoSlider, arXiv 2604.20816, released SD3.5 code):
  pref_mlp:    Linear(M,D)-SiLU-Linear(D,D), added to the conditioning vector c (timestep + pooled text);
  pref_slider: [sin(pi w), cos(pi w)] -> Linear(2M,768) -> 4-layer ReLU MLP -> m(w) in R^D shared by all
               blocks, added inside the image stream's gated MLP residual: x += gate_mlp * (mlp(.) + m).
Deviation from the reference: the slider's last layer is zero-initialised (the reference keeps the
default init), so an untrained slider changes nothing; pref=None skips both paths (bit-exact base model).
Naming rule: every parameter under a module whose name starts with `pref_`, and every `lora_` tensor, is an
adapter parameter (trained, saved in adapter files); everything else is the frozen base.

Precision (the one policy; train.py and sample.py follow it, tests/test_bf16.py enforces it):
  - the frozen base is stored and computes in the run dtype (bf16 at full size, fp32 in the tiny CPU runs);
  - every adapter tensor (LoRA A / B, both preference modules) is an fp32 master: its AdamW moments, old-policy and
    EMA copies are fp32 too. In bf16, an AdamW step of lr 3e-4 is under half an ulp of any weight >= 0.125 and
    would be lost; diffusers' LoRA scripts keep trainables in fp32 for the same reason;
  - compute runs in the base dtype: a Linear casts a wider master weight down to its input's dtype (`Linear`), so
    LoRA's matmuls run in bf16 with alpha / r folded into the GEMM and no fp32 copy of an activation is saved;
  - a backbone casts its latent and conditioning inputs once, at the top of forward (`Backbone.compute_dtype`), so
    callers keep x_t, sigma and the preference vector in fp32; sigma reaches the timestep embedding in fp32.
"""

import json
import logging
import math
import os
from collections import namedtuple
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import kernels

# torchao (--quantize; transformers imports it whenever it is installed) logs at import the kernels it has no library
# for on this machine, and torch a deprecation of how it registers them: neither is ours to show
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# ----------------------------------------------------------------------------------------------------
# Shared primitives


def timestep_embedding(t, dim=256, max_period=10000.0):
    # Sinusoidal embedding in [cos, sin] order (diffusers Timesteps(flip_sin_to_cos=True, shift=0),
    # Stability mmditx.TimestepEmbedder). t [B] on the 0..1000 scale -> [B, dim] fp32.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter (arXiv 2106.09685): y = W x + b + (alpha/r) B A x.

    `splits` (output sizes, summing to out_features) gives each chunk of a fused projection its own (A, B)
    pair: a fused qkv then carries exactly the three independent q/k/v adapters that diffusers/peft attach,
    and FLUX's single-block linear1 (q | k | v | mlp-in, unequal) its four.

    Computes in its input's dtype: a weight stored wider (an fp32 master of the preference modules, LoRA's A and B)
    is cast down to it for the matmul; its gradient flows back to the master in fp32."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.register_parameter("lora_A", None)  # [len(splits) * r, in]: A_j stacked
        self.register_parameter("lora_B", None)  # [out, r]: B_j stacked along the output
        self.lora_splits = None

    def add_lora(self, rank, alpha, splits=None):
        splits = tuple(splits or (self.out_features,))
        assert sum(splits) == self.out_features, (splits, self.out_features)
        dev = self.weight.device if self.weight.device.type != "meta" else "cpu"
        # peft's "gaussian" init: A ~ N(0, 1/r), B = 0, so the adapter starts as the identity map. fp32 masters.
        self.lora_A = nn.Parameter(torch.randn(len(splits) * rank, self.in_features, device=dev) / rank)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.lora_splits, self.lora_scale, self.lora_enabled = splits, alpha / rank, True

    def lora_pairs(self):
        # [(A_j [r, in], B_j [out_j, r])] per output chunk
        r = self.lora_B.shape[1]
        return list(zip(self.lora_A.split(r), self.lora_B.split(self.lora_splits)))

    def lora_delta_weight(self):
        return torch.cat([B @ A for A, B in self.lora_pairs()]) * self.lora_scale

    def forward(self, x):
        y = F.linear(x, compute(self.weight, x), compute(self.bias, x))
        if self.lora_A is None or not self.lora_enabled:
            return y
        # h = A x for every chunk at once [.., chunks * r]; then y + scale * B_blockdiag h in one GEMM whose epilogue
        # adds y and applies the scale: B_j on the diagonal of [out, chunks * r] (zeros elsewhere cost chunks x the
        # small second matmul, and save a concatenation and two elementwise passes over [.., out])
        h = F.linear(x, compute(self.lora_A, x))
        B = compute(self.lora_B, x)
        if len(self.lora_splits) > 1:
            B = torch.block_diag(*B.split(self.lora_splits))
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), B.t(), alpha=self.lora_scale).view(y.shape)


def compute(w, x):
    # a weight in x's dtype for the matmul: an fp32 master is cast down; a narrower weight than x is left to fail
    # in F.linear (an input that missed its backbone's cast would otherwise upcast a frozen bf16 base silently)
    if w is None or w.dtype == x.dtype or w.element_size() < x.element_size():
        return w
    return w.to(x.dtype)


def attention(q, k, v, mask=None):
    # q, k, v [B, H, L, Dh] -> [B, L, H*Dh]. mask: None or a key mask [B, Lk] (True/1 = attend, 0 = padding).
    # SDPA picks FlashAttention/cuDNN on GPU (with a mask: the memory-efficient kernel).
    if mask is not None:
        if mask.shape != (q.shape[0], k.shape[2]):
            raise ValueError(f"attention mask must be [B, Lk] = {[q.shape[0], k.shape[2]]}, got {list(mask.shape)}")
        mask = mask.bool()[:, None, None, :]  # [B, 1, 1, Lk], broadcast over heads and queries
    return rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h l d -> b l (h d)")


def heads_first(*ts):
    # [B, L, H, Dh] -> [B, H, L, Dh] views (what SDPA takes)
    return [t.transpose(1, 2) for t in ts]


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EmbedMLP(nn.Module):
    # Linear-SiLU-Linear, keys mlp.0 / mlp.2 (Stability's TimestepEmbedder / VectorEmbedder)
    def __init__(self, din, dim):
        super().__init__()
        self.mlp = nn.Sequential(Linear(din, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


def chunks(t, names):
    # the adaLN modulation output [B, n*D] -> its n named [B, D] views (shift_msa, scale_msa, gate_msa, ...)
    return CHUNK_TYPES[names](*t.chunk(len(names), dim=-1))


CHUNK_TYPES = {}  # a modulation vocabulary's prefixes -> their namedtuple types (`chunks`)


def chunk_names(*names):
    # a modulation vocabulary (the chunks of an adaLN output, in order): every prefix gets its namedtuple type here,
    # at import, so that torch.compile traces `chunks` inside a block (building a SimpleNamespace breaks the graph)
    for k in range(1, len(names) + 1):
        CHUNK_TYPES[names[:k]] = namedtuple("Chunks", names[:k])
    return names


# The one modulation vocabulary, in the order every backbone's adaLN output is laid out: (shift, scale, gate) of the
# attention, of the MLP, of MMDiT-X's second attention. SD3.5 blocks take 2, 6 or 9 chunks (last context block,
# plain, dual attention: Stability mmditx.py DismantledBlock), FLUX 6 (double) or 3 (single: BFL layers.py
# Modulation), LTX-2 6 per stream (ltx-core BasicAVTransformerBlock).
MOD = chunk_names(
    "shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp", "shift_msa2", "scale_msa2", "gate_msa2"
)
# LTX-2's audio <-> video tables, scale first (transformer_ltx2.py:735-809): the a2v and v2a modulations, the gate
AV_MOD = chunk_names("a2v_scale", "a2v_shift", "v2a_scale", "v2a_shift", "gate")


class SliderProjector(nn.Module):
    # The shared slider vector m(w) (the released T2I code's slider conditioning,
    # SD3Transformer2DModelWithConditioning; Kontinuous Kontext's SliderProjector with num_freqs=1).
    def __init__(self, pref_dim, dim, pe_dim=768, layers=4):
        super().__init__()
        self.pe = Linear(2 * pref_dim, pe_dim)
        mlp = [Linear(pe_dim, dim)]
        for _ in range(layers - 1):
            mlp += [nn.ReLU(), Linear(dim, dim)]
        self.mlp = nn.Sequential(*mlp)
        nn.init.zeros_(self.mlp[-1].weight)  # deviation (documented above): untrained slider = no-op
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w, dtype=torch.float32):
        # w [B, M] in fp32 -> m [B, D] computed in `dtype` (the base's compute dtype; the weights are fp32 masters)
        w = w.float() * math.pi
        return self.mlp(self.pe(torch.cat([torch.sin(w), torch.cos(w)], -1).to(dtype)))


def pref_mlp(pref_dim, dim):
    m = nn.Sequential(Linear(pref_dim, dim), nn.SiLU(), Linear(dim, dim))
    nn.init.normal_(m[2].weight, std=1e-3)  # reference: near-identity start
    nn.init.zeros_(m[2].bias)
    return m


class Backbone(nn.Module):
    """What every backbone network shares: its config `cfg` (a dataclass with `pref_dim`), its name, its LoRA
    targets and the two preference paths. A subclass builds its blocks (in nn.ModuleLists) and calls
    `init_preference()` at the end of __init__; its forward takes `net(*latents, sigma, pref=None, **cond)`, casts
    its inputs to `compute_dtype` and calls `preference()`."""

    name = ""  # --backbone
    lora_targets = {}  # module path suffix -> output sizes of a fused projection as fractions (one adapter each)
    grad_ckpt = False  # gradient checkpointing per block (training at full size)

    def __init__(self):
        super().__init__()
        self._tables = {}  # `tables`' cache

    def _apply(self, fn, *args, **kwargs):
        self._tables.clear()  # .to(), .half(), ...: tables are made again on the new device when first needed
        return super()._apply(fn, *args, **kwargs)

    def tables(self, key, make):
        """Position tables (RoPE cos / sin), made once per input shape and device, not at every forward: the forward
        of a rollout step or an update micro-batch then starts without rebuilding them (the last 8 shapes kept)."""
        if key not in self._tables:
            if len(self._tables) >= 8:
                self._tables.pop(next(iter(self._tables)))
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable under autograd later
                self._tables[key] = make()
        return self._tables[key]

    def init_preference(self):
        # pref_mlp, then the slider (this order fixes the random init); nothing when cfg.pref_dim == 0. Both in fp32,
        # the adapters' master dtype, whatever the base's
        if self.cfg.pref_dim:
            self.pref_mlp = pref_mlp(self.cfg.pref_dim, self.cfg.hidden).float()
            self.pref_slider = SliderProjector(self.cfg.pref_dim, self.cfg.hidden).float()

    @property
    def compute_dtype(self):
        # the frozen base's dtype, in which the network computes: its first parameter's (the adapters come later)
        return next(self.parameters()).dtype

    def preference(self, pref, batch, dtype):
        # -> (addition to the conditioning vector [B, D], slider vector m [B, D]) in dtype; (None, None) for the base
        # model. pref [B, M] in any float dtype: the slider's sin / cos see it in fp32
        if pref is None:
            return None, None
        if self.cfg.pref_dim == 0:
            raise ValueError("this network has no preference input (pref_dim=0); pass pref=None")
        if pref.dim() != 2 or pref.shape != (batch, self.cfg.pref_dim):
            raise ValueError(f"pref must have shape [{batch}, {self.cfg.pref_dim}], got {list(pref.shape)}")
        return self.pref_mlp(pref.to(dtype)), self.pref_slider(pref, dtype)

    def blocks(self):
        # the repeated blocks, in order (every nn.ModuleList child): what gradient checkpointing, regional compilation
        # and the memory plan work on
        return [b for ml in self.children() if isinstance(ml, nn.ModuleList) for b in ml]

    def compile_blocks(self, **options):
        """Regional torch.compile: each repeated block compiled on its own. Blocks of one class share their compiled
        code (parameters are graph inputs), so compile time does not grow with depth, and anything outside the blocks
        (embedders, RoPE tables, the adapter swaps of train.py) stays eager."""
        # one block class runs as up to ~4 kinds (first / last block, MMDiT-X dual attention) x 3 call modes (a graph
        # with w, no graph with w, no graph without: the update, the rollout, the KL reference), each a compiled entry
        # of the same code object: past dynamo's default of 8 the rest would silently run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for blk in self.blocks():
            blk.compile(**options)
        return self

    def run(self, blk, *args):
        # one block, under gradient checkpointing when self.grad_ckpt is set (training at full size)
        if self.grad_ckpt and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)


def add_preference(net, pref_dim):
    """Give a loaded base network the two preference paths for `pref_dim` objectives (fresh init, fp32 masters) on
    the device of its parameters."""
    p = next(net.parameters())
    with torch.device(p.device if p.device.type != "meta" else "cpu"):
        net.cfg = replace(net.cfg, pref_dim=pref_dim)
        net.init_preference()
    return net


# ----------------------------------------------------------------------------------------------------
# LoRA management and adapter files (LoRA + preference modules, the trainable part)


def add_lora(net, rank=32, alpha=64, targets=None):
    """Attach LoRA to every Linear whose path ends with one of `targets` (default: the backbone's
    `lora_targets`; fused projections get one adapter per chunk), freeze the base weights and leave LoRA +
    preference modules trainable. Returns the list of adapted module names."""
    targets = list(targets or net.lora_targets)
    names = []
    for name, mod in net.named_modules():
        hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
        if isinstance(mod, Linear) and hit is not None:
            fractions = net.lora_targets.get(hit, (1,))
            mod.add_lora(rank, alpha, [round(mod.out_features * f / sum(fractions)) for f in fractions])
            names.append(name)
    if not names:
        raise ValueError(f"no module matches the LoRA targets {targets}")
    net.lora_config = dict(rank=rank, alpha=alpha, targets=targets)
    set_trainable(net)
    return names


def quantize_int8(net, device=None):
    """The frozen base's Linear weights in int8, weight-only, one scale per output channel (torchao's
    Int8WeightOnlyConfig: F.linear on such a weight dequantizes inside its matmul), about half a bf16 base's bytes.
    LoRA (a Linear's lora_A / lora_B, not its weight) and the preference modules are left as they are, fp32 masters
    on top. device: each Linear moves there as it is quantized (a base read on the CPU reaches the GPU at int8 size)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    frozen = lambda m, name: isinstance(m, nn.Linear) and not name.split(".")[0].startswith("pref_")
    quantize_(net, Int8WeightOnlyConfig(), filter_fn=frozen, device=device)
    return net.to(device) if device is not None else net


def set_trainable(net):
    for n, p in net.named_parameters():
        p.requires_grad_(is_adapter_param(n))


def is_adapter_param(name):
    return ".lora_" in name or any(part.startswith("pref_") for part in name.split("."))


def adapter_state(net):
    # The trainable tensors (LoRA + preference modules); old/reference policies are such states.
    return {n: p for n, p in net.named_parameters() if is_adapter_param(n)}


def set_lora_enabled(net, enabled):
    for m in net.modules():
        if isinstance(m, Linear) and m.lora_A is not None:
            m.lora_enabled = enabled


def merge_lora(net):
    # Fold every adapter into its base weight (for export / inference speed); removes the adapters.
    for m in net.modules():
        if isinstance(m, Linear) and m.lora_A is not None:
            with torch.no_grad():
                m.weight += m.lora_delta_weight().to(m.weight.dtype)
            m.lora_A = m.lora_B = None


def save_adapters(net, path, state=None, objectives=None, extra=None):
    """LoRA + preference modules, with what they belong to: the backbone, the base config, the objective names.
    state: an adapter state to write instead of the live weights (e.g. the EMA); extra: more metadata (str->str)."""
    meta = {
        "format": "paretoslider-adapter",
        "backbone": net.name,
        "lora": json.dumps(getattr(net, "lora_config", None)),
        "config": json.dumps(asdict(net.cfg)),
        "objectives": json.dumps(objectives),
        **(extra or {}),
    }
    state = {n: p.detach().contiguous().cpu() for n, p in (state or adapter_state(net)).items()}
    atomic_save(state, path, meta)


def read_adapter_meta(path):
    """-> the adapter file's metadata with lora/config/objectives decoded; errors name the file."""
    meta = read_safetensors_meta(path)
    if meta.get("format") != "paretoslider-adapter":
        raise ValueError(f"{path}: not a ParetoSlider adapter file: {file_kind(meta)}")
    try:
        return {**meta, **{k: json.loads(meta[k]) for k in ("lora", "config", "objectives")}}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed adapter metadata ({e})") from None


def file_kind(meta):
    # what one of this project's .safetensors files is, from its header metadata (for errors on misplaced files)
    if meta.get("format") == "paretoslider-adapter":
        return "it is a ParetoSlider adapter (LoRA + preference modules): pass it with --lora, the base with --weights"
    if "step" in meta and "config" in meta:
        return "it is a train.py checkpoint (optimizer state included): use its run folder's adapters.safetensors"
    if "lora_adapter_metadata" in meta:
        return "it is a LoRA exported for diffusers (pipe.load_lora_weights): use the run's adapters.safetensors"
    return "no adapter metadata (a base model checkpoint?): pass the run's adapters.safetensors"


def load_adapters(net, path, objectives=None):
    """Load LoRA + preference modules saved by save_adapters. Refused, naming both sides, when the adapter belongs
    to another backbone, another base config, or (if given) other objectives; then strict on names and shapes."""
    meta = read_adapter_meta(path)
    if meta["backbone"] != net.name:
        raise ValueError(f"{path}: adapter of backbone {meta['backbone']!r}, but the network is {net.name!r}")
    if meta["config"].get("pref_dim") != net.cfg.pref_dim:
        names = f" {meta['objectives']}" if meta["objectives"] else ""
        raise ValueError(
            f"{path}: adapter for {meta['config'].get('pref_dim')} objectives{names}, but the network "
            f"has {net.cfg.pref_dim}"
        )
    diff = [
        f"{k}: adapter {v!r} vs network {getattr(net.cfg, k, None)!r}"
        for k, v in meta["config"].items()
        if k != "pref_dim" and _plain(v) != _plain(getattr(net.cfg, k, None))
    ]
    if diff:
        raise ValueError(f"{path}: adapter trained on another base model: " + "; ".join(diff))
    if objectives is not None and meta["objectives"] is not None and list(meta["objectives"]) != list(objectives):
        raise ValueError(f"{path}: adapter trained for objectives {meta['objectives']}, asked for {list(objectives)}")
    lora = meta["lora"]
    if lora and getattr(net, "lora_config", None) is None:
        add_lora(net, lora["rank"], lora["alpha"], tuple(lora["targets"]))
    sd, _ = read_safetensors(path)
    own = adapter_state(net)
    check_keys(own, sd, what=f"adapter file {path}")
    bad = [n for n, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values in {', '.join(bad[:3])}" + (" …" if len(bad) > 3 else ""))
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(sd[n])
    return net


def _plain(v):  # JSON-comparable form of a config value (tuples read back as lists)
    return list(v) if isinstance(v, (tuple, list)) else v


def export_lora_diffusers(net, path):
    """Write the LoRA in the file format diffusers' `pipe.load_lora_weights(path)` reads
    (pytorch_lora_weights.safetensors; rank and alpha in the `lora_adapter_metadata` header), under the
    backbone's diffusers module names (`transformer.<module>.lora_A/B.weight`, a fused projection split into its parts;
    targets are full module names: a bare `proj_out` would also match FLUX's final projection). The preference modules
    have no diffusers counterpart and are not in this file."""
    names, out = BACKBONES[net.name].lora_names, {}
    for name, m in net.named_modules():
        if isinstance(m, Linear) and m.lora_A is not None:
            for (A, B), dn in zip(split_lora(m), names(net.cfg, name), strict=True):
                out[f"transformer.{dn}.lora_A.weight"], out[f"transformer.{dn}.lora_B.weight"] = A, B
    targets = sorted({k[len("transformer.") : -len(".lora_A.weight")] for k in out if "lora_A" in k})
    lc = net.lora_config
    adapter = {
        "transformer.r": lc["rank"],
        "transformer.lora_alpha": lc["alpha"],
        "transformer.target_modules": targets,
    }
    atomic_save({k: v.float().cpu() for k, v in out.items()}, path, {"lora_adapter_metadata": json.dumps(adapter)})


def split_lora(m):
    # [(A_j, B_j)] of a Linear's adapter, detached: what a diffusers export writes per projection
    return [(A.detach().contiguous(), B.detach().contiguous()) for A, B in m.lora_pairs()]


# ----------------------------------------------------------------------------------------------------
# Checkpoint I/O: safetensors files, diffusers folders (sharded or not), strict key checks, atomic writes


def atomic_write(path, write):
    """write(tmp) writes the file; then rename: a crash mid-write never leaves a truncated file under the final
    name, and a failed write leaves no temporary behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sweep_temporaries(folder, name=None):
    """Remove what killed atomic writes left in `folder` (`<file>.tmp<pid>`, of `name` only if given), never a live
    process's: a run or sampler writing beside this one keeps its temporary."""
    if not os.path.isdir(folder):
        return
    for f in os.listdir(folder):
        stem, _, pid = f.rpartition(".tmp")
        if stem and pid.isdigit() and (name is None or stem == name) and not pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, f))
            except OSError:
                pass


def pid_alive(pid):
    if pid == os.getpid():
        return False  # ours, from a write that failed before this call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_save(state, path, metadata=None):
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def atomic_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, allow_nan=False)

    atomic_write(path, write)


def open_safetensors(path, read):
    """read(safe_open handle) on a .safetensors file: lazily, only what `read` asks for is read. Errors name it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from None


def read_safetensors(path, keep=None, lazy=False):
    """-> (state dict, metadata). keep(name) -> bool: read only those tensors (one component of a combined file,
    without loading the other 40 GB). lazy: Lazy tensors instead, nothing read yet (FSDP's sharded loading)."""
    if lazy:
        open_safetensors(path, header)  # the errors, named
        f = safe_open(path, framework="pt", device="cpu")  # kept open by the Lazy tensors that read from it
        return {k: Lazy.of(f, k) for k in f.keys() if not keep or keep(k)}, header(f)
    return open_safetensors(path, lambda f: ({k: f.get_tensor(k) for k in f.keys() if not keep or keep(k)}, header(f)))


class Lazy:
    """A checkpoint tensor not read yet: rows of named tensors in .safetensors files, concatenated along dim 0, so
    that the conversions from diffusers (q, k, v fused into one qkv; two halves swapped) run on it unchanged
    (torch.cat and .chunk along dim 0 work as on a tensor). read(a, b) reads rows a..b alone, through safe_open's
    slices: an FSDP rank reads its shard of each parameter (dim 0, as fully_shard splits it), never the whole file.
    Lazy.bytes_read counts what every read materialised."""

    bytes_read = 0

    def __init__(self, parts, shape):
        self.parts, self.shape = parts, torch.Size(shape)  # parts: [(safe_open handle, tensor name, row, end row)]

    @staticmethod
    def of(f, name):  # one tensor of an open file; a 0-dim one (no rows to split) is read at once
        shape = f.get_slice(name).get_shape()
        return Lazy([(f, name, 0, shape[0])], shape) if shape else f.get_tensor(name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        ts, dim = args[0], (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
        if func is not torch.cat or dim != 0 or not all(isinstance(t, Lazy) for t in ts):
            return NotImplemented
        return Lazy([p for t in ts for p in t.parts], (sum(t.shape[0] for t in ts), *ts[0].shape[1:]))

    def chunk(self, n, dim=0):
        assert dim == 0, "a Lazy tensor splits along its rows only"
        step = -(-self.shape[0] // n)
        return [self.rows(a, min(a + step, self.shape[0])) for a in range(0, self.shape[0], step)]

    def rows(self, a, b):  # rows a..b, still not read
        parts, at = [], 0
        for f, name, lo, hi in self.parts:
            s, e = max(lo, lo + a - at), min(hi, lo + b - at)
            if s < e:
                parts.append((f, name, s, e))
            at += hi - lo
        return Lazy(parts or [(*self.parts[0][:2], 0, 0)], (b - a, *self.shape[1:]))  # (no rows: an empty slice)

    def read(self, a=0, b=None):
        """Rows a..b (default: all) as a tensor, reading those rows and nothing else."""
        out = [f.get_slice(name)[s:e] for f, name, s, e in self.rows(a, self.shape[0] if b is None else b).parts]
        Lazy.bytes_read += sum(t.numel() * t.element_size() for t in out)
        return torch.cat(out) if len(out) > 1 else out[0]


def safetensors_names(path):  # -> (the tensor names, the header metadata), without reading a tensor
    return open_safetensors(path, lambda f: (list(f.keys()), header(f)))


def read_safetensors_meta(path):  # only the header metadata (no tensor is read)
    return open_safetensors(path, header)


header = lambda f: f.metadata() or {}  # a safe_open handle's metadata (None when the file has none)


def full(t):
    """t whole: gathered where it is an FSDP2 shard (a DTensor; a collective, so every rank calls it), else t."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(p, value):
    """A whole tensor as p holds it: p's shard of it where p is an FSDP2 DTensor (no communication: every rank has
    the whole value), else the value."""
    if not isinstance(p, DTensor):
        return value
    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)


def set_full(p, value):
    """p.copy_(value) from a whole value, a tensor or a Lazy one; where p is an FSDP2 shard (dim 0 split as
    torch.chunk splits it), only this rank's rows are read and copied into it."""
    with torch.no_grad():
        if isinstance(p, DTensor):
            assert tuple(p.placements) == (Shard(0),), p.placements
            n, W, r = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
            a, b = min(r * -(-n // W), n), min((r + 1) * -(-n // W), n)
            p, value = p.to_local(), value.rows(a, b) if isinstance(value, Lazy) else value[a:b]
        p.copy_(value.read() if isinstance(value, Lazy) else value)


def materialise(net, device, shard=None):
    """A net loaded with lazy=True (built on the meta device, its checkpoint's tensors in net.lazy, not read; adapters
    perhaps added since): shard(net) (FSDP2's fully_shard per block, or None), then every tensor made on `device` and
    filled, the checkpoint's from the file (a shard: this rank's rows alone), the others (adapters) as they were."""
    live = {n: t.detach().clone() for n, t in net.state_dict().items() if t.device.type != "meta"}
    net.to("meta")
    if shard is not None:
        shard(net)
    net.to_empty(device=device)
    values = {**net.lazy, **live}
    for n, t in (*net.named_parameters(), *net.named_buffers()):
        set_full(t, values[n])
    del net.lazy
    return net


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def read_diffusers_folder(folder, lazy=False):
    """config.json + diffusion_pytorch_model(.safetensors | -0000x-of-0000n.safetensors + index)."""
    config = read_json(os.path.join(folder, "config.json"))
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return config, read_safetensors(single, lazy=lazy)[0]
    if os.path.isfile(index):
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise ValueError(f"{index}: no weight_map (not a diffusers shard index)") from None
        sd = {}
        for s in shards:
            sd.update(read_safetensors(os.path.join(folder, s), lazy=lazy)[0])
        return config, sd
    raise FileNotFoundError(f"{folder} has config.json but no diffusion_pytorch_model.safetensors[.index.json]")


def check_keys(expected, got, what="checkpoint"):
    # expected: {name: tensor or shape}; got: {name: tensor}. One error naming every problem.
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else tuple(t)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    bad = [
        f"{k}: checkpoint {shape(got[k])} vs model {shape(expected[k])}"
        for k in sorted(set(got) & set(expected))
        if shape(got[k]) != shape(expected[k])
    ]
    if missing or unexpected or bad:
        show = lambda xs: ", ".join(xs[:8]) + (f" … (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        msg = [f"{what} does not match the model:"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {show(missing)}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
        if bad:
            msg.append(f"  mis-shaped keys ({len(bad)}): {show(bad)}")
        raise ValueError("\n".join(msg))


# ----------------------------------------------------------------------------------------------------
# Loading: one generic path for every backbone, driven by the BACKBONES table at the end of the file

BUNDLED = ("first_stage_model.", "text_encoders.", "conditioner.", "cond_stage_model.")  # not the transformer


def assign_checkpoint(make, sd, dtype=torch.float32, device="cpu", what="checkpoint"):
    """Build make() on the meta device (no random init, no second copy) and assign the checkpoint tensors as its
    parameters and buffers, floating ones cast to dtype; strict: every key, every shape."""
    with torch.device("meta"):
        net = make()
    check_keys(net.state_dict(), sd, what)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    net.load_state_dict(sd, strict=True, assign=True)
    return net


def build(cls, cfg, sd=None, dtype=torch.float32, device="cpu", what="checkpoint", lazy=False):
    """sd=None: random init (tests, tiny default). Otherwise assign the checkpoint to the base (assign_checkpoint),
    then materialise the preference modules (in no base checkpoint). lazy: sd's tensors are Lazy; the base stays on
    the meta device, its checkpoint in net.lazy, until materialise (FSDP: each rank reads its shard)."""
    if lazy:
        with torch.device("meta"):
            net = cls(replace(cfg, pref_dim=0)).to(dtype)
        check_keys(net.state_dict(), sd, what)
        net.lazy = sd
    elif sd is None:  # the base in dtype, then the preference modules (fp32 masters): the same random draws as cls(cfg)
        with torch.device(device):
            net = cls(replace(cfg, pref_dim=0)).to(dtype)
    else:
        net = assign_checkpoint(lambda: cls(replace(cfg, pref_dim=0)), sd, dtype, device, what)
    return add_preference(net, cfg.pref_dim) if cfg.pref_dim else net


def load_transformer(path, pref_dim=0, dtype=torch.float32, device="cpu", lazy=False):
    """Load a backbone from a diffusers folder (config.json + safetensors, sharded or not; or a repo
    root holding transformer/) or an original single .safetensors file. Backbone and config are
    inferred (BACKBONES). pref_dim > 0 adds freshly initialised preference modules for that many objectives.
    lazy: no tensor read yet (build's lazy: for FSDP, materialise reads each rank's shard)."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        else:
            raise FileNotFoundError(
                f"{path}: neither a diffusers model folder (config.json) nor a repo root with transformer/"
            )
    if os.path.isdir(path):
        config, sd = read_diffusers_folder(path, lazy)
        name = config.get("_class_name")
        spec = next((b for b in BACKBONES.values() if b.diffusers_class == name), None)
        if spec is None:
            raise ValueError(
                f"{path}: unsupported diffusers class {name!r} (supported: "
                f"{', '.join(b.diffusers_class for b in BACKBONES.values())})"
            )
        cfg = spec.config_from_diffusers(config)
        sd = spec.from_diffusers(sd, cfg)
    elif os.path.isfile(path):
        # which tensors are the transformer's, from the names alone; then only those are read (a combined file holds
        # the VAEs, the vocoder and the text connectors beside it: tens of GB never materialised)
        names, meta = safetensors_names(path)
        dm = "model.diffusion_model."
        prefix = dm if any(k.startswith(dm) for k in names) else ""
        names = [k[len(prefix) :] for k in names if k.startswith(prefix) and (prefix or not k.startswith(BUNDLED))]
        spec = next((b for b in BACKBONES.values() if b.signature in names), None)
        if spec is None:
            mine = meta.get("format") or "step" in meta or "lora_adapter_metadata" in meta
            raise ValueError(
                f"{path}: not a recognised base checkpoint (none of the signature keys "
                f"{', '.join(b.signature for b in BACKBONES.values())})" + (f"; {file_kind(meta)}" if mine else "")
            )
        wanted = {prefix + k for k in names if not k.startswith(spec.bundled)}  # e.g. LTX-2's text connectors out
        sd = {k[len(prefix) :]: v for k, v in read_safetensors(path, wanted.__contains__, lazy)[0].items()}
        cfg = spec.config_from_state(sd, meta)
    else:
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return build(spec.cls, replace(cfg, pref_dim=pref_dim), sd, dtype, device, str(path), lazy)


# ----------------------------------------------------------------------------------------------------
# SD3.5: MMDiT (large) and MMDiT-X (medium). Stability mmditx.py; diffusers transformer_sd3.py.


@dataclass
class SD3Config:
    depth: int = 24  # joint blocks
    hidden: int = 1536  # width D = heads * head_dim
    heads: int = 24
    patch: int = 2
    in_channels: int = 16  # latent channels (3 for the pixel-space tiny default)
    out_channels: int = 16
    context_dim: int = 4096  # text token width (T5-XXL; CLIP features are zero-padded to it)
    pooled_dim: int = 2048  # CLIP-L + bigG projected pooled
    pos_embed_max: int = 384  # side of the stored sin-cos table, center-cropped to the token grid
    qk_norm: bool = True  # per-head RMSNorm on q, k (both SD3.5 models)
    dual_attention_layers: tuple = ()  # MMDiT-X blocks with a second, image-only self-attention
    mlp_ratio: float = 4.0
    pref_dim: int = 0  # number of objectives M (0: plain base model)


SD3_PRESETS = {
    "sd35-medium": dict(depth=24, hidden=1536, heads=24, pos_embed_max=384, dual_attention_layers=tuple(range(13))),
    "sd35-large": dict(depth=38, hidden=2432, heads=38, pos_embed_max=192),
    # CPU default: pixel space 32x32 RGB, patch 4 -> 64 tokens; MMDiT-X style (dual attention, qk norm)
    "sd35-tiny": dict(depth=4, hidden=128, heads=4, patch=4, in_channels=3, out_channels=3, context_dim=64,
                      pooled_dim=64, pos_embed_max=8, dual_attention_layers=(0, 1)),
}  # fmt: skip


class SD3Attention(nn.Module):
    # keys: qkv [3D, D] (fused q|k|v), ln_q/ln_k [head_dim], proj [D, D] (absent when pre_only)
    def __init__(self, dim, heads, qk_norm, pre_only=False):
        super().__init__()
        self.heads, self.qkv = heads, Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q, self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)
        if not pre_only:
            self.proj = Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b l h d", three=3, h=self.heads)
        if hasattr(self, "ln_q"):
            q, k = kernels.qk_norm_rope(q, k, self.ln_q.weight, self.ln_k.weight, None, None, self.ln_q.eps)
        return q, k, v


class SD3Block(nn.Module):
    """One stream of a joint block (Stability's DismantledBlock): adaLN-Zero modulation, attention
    projections, MLP. The attention itself is computed jointly over both streams in JointBlock."""

    def __init__(self, dim, heads, mlp_ratio, qk_norm, pre_only=False, dual=False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        n_mod = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, n_mod * dim))
        self.attn = SD3Attention(dim, heads, qk_norm, pre_only)
        if dual:
            self.attn2 = SD3Attention(dim, heads, qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def pre_attention(self, x, c):
        # -> (q, k, v) of the joint attention, the modulated input of attn2, and the modulation chunks.
        n = 2 if self.pre_only else (9 if self.dual else 6)
        mod = chunks(self.adaLN_modulation(c), MOD[:n])
        h = kernels.modulate(x, mod.shift_msa, mod.scale_msa, 1e-6)
        q, k, v = self.attn.qkv_heads(h)
        h2 = kernels.modulate(x, mod.shift_msa2, mod.scale_msa2, 1e-6) if self.dual else None
        return (q, k, v), h2, mod

    def post_attention(self, x, attn_out, h2, mod, m=None):
        y, gate = self.attn.proj(attn_out), mod.gate_msa
        if self.dual:  # MMDiT-X: image-only self-attention on the same LN(x), its own modulation
            x = kernels.gated_residual(x, gate, y)
            y, gate = self.attn2.proj(attention(*heads_first(*self.attn2.qkv_heads(h2)))), mod.gate_msa2
        x, h = kernels.gated_residual_modulate(x, gate, y, mod.shift_mlp, mod.scale_mlp, 1e-6)  # residual, LN, modulate
        return kernels.gated_residual(x, mod.gate_mlp, self.mlp(h), m)  # m: slider vector (image stream only)


class JointBlock(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        last = i == cfg.depth - 1
        self.context_block = SD3Block(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, pre_only=last)
        self.x_block = SD3Block(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, dual=i in cfg.dual_attention_layers)

    def forward(self, ctx, x, c, m=None):
        (qc, kc, vc), _, cmod = self.context_block.pre_attention(ctx, c)
        (qx, kx, vx), h2, xmod = self.x_block.pre_attention(x, c)
        # one SDPA over [context, image] tokens (Stability's order; no mask, no RoPE); concatenating the
        # heads-first views gives SDPA contiguous [B, H, Lc+Lx, Dh] inputs
        q, k, v = (torch.cat(heads_first(a, b), 2) for a, b in ((qc, qx), (kc, kx), (vc, vx)))
        o = attention(q, k, v)
        oc, ox = o[:, : ctx.shape[1]], o[:, ctx.shape[1] :]
        x = self.x_block.post_attention(x, ox, h2, xmod, m)
        ctx = None if self.context_block.pre_only else self.context_block.post_attention(ctx, oc, None, cmod)
        return ctx, x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))  # (shift, scale)
        self.linear = Linear(dim, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(kernels.modulate(x, shift, scale, 1e-6))


def sincos_2d(M, D):
    # [1, M*M, D]: first half of the features encodes the row, second half the column (MAE/DiT layout)
    if torch.empty(0).device.type == "meta":
        return torch.empty(1, M * M, D)
    pos = torch.arange(M, dtype=torch.float64)
    om = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D // 4))
    emb = lambda p: torch.cat([torch.sin(p[:, None] * om), torch.cos(p[:, None] * om)], 1)  # [M, D/2]
    rows, cols = emb(pos)[:, None].expand(M, M, -1), emb(pos)[None].expand(M, M, -1)
    return torch.cat([rows, cols], -1).reshape(1, M * M, D).float()


class SD3Transformer(Backbone):
    """SD3 / SD3.5 MMDiT(-X). forward(x [B,C,H,W], sigma [B], context [B,L,Dctx], pooled [B,Dpool],
    pref [B,M] | None) -> v [B,C,H,W], the rectified-flow velocity eps - x0 (diffusers' output at
    timestep = 1000 * sigma)."""

    name = "sd35"
    lora_targets = {"attn.qkv": (1, 1, 1), "attn.proj": (1,)}  # both streams' attention (reference targets)

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.cfg, D = cfg, cfg.hidden
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, D, cfg.patch, stride=cfg.patch)
        # fixed 2-D sin-cos table; released checkpoints carry it, random inits (tests, --tiny) compute it
        self.register_buffer("pos_embed", sincos_2d(cfg.pos_embed_max, D))
        self.t_embedder = EmbedMLP(256, D)
        self.y_embedder = EmbedMLP(cfg.pooled_dim, D)
        self.context_embedder = Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch, cfg.out_channels)
        self.init_preference()

    def cropped_pos_embed(self, h, w):
        M = self.cfg.pos_embed_max
        if h > M or w > M:
            raise ValueError(f"token grid {h}x{w} exceeds the positional table {M}x{M}")
        top, left = (M - h) // 2, (M - w) // 2
        return self.pos_embed.view(1, M, M, -1)[:, top : top + h, left : left + w].flatten(1, 2)

    def forward(self, x, sigma, context, pooled, pref=None):
        dt = self.compute_dtype  # inputs cast once, here (sigma stays as given: the timestep embedding is fp32)
        x, context, pooled = x.to(dt), context.to(dt), pooled.to(dt)
        B, _, H, W = x.shape
        p = self.cfg.patch
        h, w = H // p, W // p
        # contiguous tokens: the conv's [B, D, h, w] layout would otherwise follow the residual stream through
        # every block (elementwise ops keep their input's strides) and make each add and copy a strided one
        x = rearrange(self.x_embedder.proj(x), "b d h w -> b (h w) d").contiguous()
        x = x + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder(timestep_embedding(1000 * sigma).to(x.dtype)) + self.y_embedder(pooled)
        dc, m = self.preference(pref, B, c.dtype)
        if dc is not None:
            c = c + dc
        ctx = self.context_embedder(context)
        for blk in self.joint_blocks:
            ctx, x = self.run(blk, ctx, x, c, m)
        x = self.final_layer(x, c)  # [B, h*w, p*p*C], channel fastest within a patch
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)


def sd3_config_from_state(sd, meta=None):
    # Architecture facts read from tensor shapes (as Stability's sd3_impls.BaseModel does).
    depth = len({k.split(".")[1] for k in sd if k.startswith("joint_blocks.")})
    D, cin, p, _ = sd["x_embedder.proj.weight"].shape
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    head_dim = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk else 64
    M = math.isqrt(sd["pos_embed"].shape[1])
    if M * M != sd["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed of {sd['pos_embed'].shape[1]} positions is not a square table")
    dual = tuple(sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k}))
    return SD3Config(
        depth=depth,
        hidden=D,
        heads=D // head_dim,
        patch=p,
        in_channels=cin,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p),
        context_dim=sd["context_embedder.weight"].shape[1],
        pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max=M,
        qk_norm=qk,
        dual_attention_layers=dual,
    )


def check_options(c, cls, known, fixed=(), bad=()):
    """A diffusers config.json `c` of class `cls`: refused in one line when it has an option not in `known` (names,
    space-separated) nor in `fixed` ({option: the one value implemented here}), or a fixed option set otherwise (or
    a reason in `bad`): a model we would load wrongly (diffusers' later features) never loads."""
    extra = sorted(k for k in c if not k.startswith("_") and k not in {*known.split(), *dict(fixed)})
    if extra:
        raise ValueError(f"unsupported {cls} config options: {extra}")
    bad = [f"{k}={c[k]!r} (only {v!r})" for k, v in dict(fixed).items() if k in c and c[k] != v] + list(bad)
    if bad:
        raise ValueError(f"unsupported {cls} options (a later release's features?): " + ", ".join(bad))


def sd3_config_from_diffusers(c):
    known = (
        "num_layers attention_head_dim num_attention_heads patch_size in_channels out_channels joint_attention_dim "
        "caption_projection_dim pooled_projection_dim pos_embed_max_size qk_norm dual_attention_layers sample_size"
    )
    check_options(c, "SD3Transformer2DModel", known)
    if c.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"unsupported qk_norm {c['qk_norm']!r} (supported: None, 'rms_norm')")
    D = c["num_attention_heads"] * c["attention_head_dim"]
    if c.get("caption_projection_dim", D) != D:
        raise ValueError(f"caption_projection_dim {c['caption_projection_dim']} != heads*head_dim {D}")
    return SD3Config(
        depth=c["num_layers"],
        hidden=D,
        heads=c["num_attention_heads"],
        patch=c["patch_size"],
        in_channels=c["in_channels"],
        out_channels=c.get("out_channels") or c["in_channels"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        pos_embed_max=c["pos_embed_max_size"],
        qk_norm=c.get("qk_norm") == "rms_norm",
        dual_attention_layers=tuple(c.get("dual_attention_layers") or ()),
    )


def _swap_halves(t):
    # (shift, scale) <-> (scale, shift): diffusers' AdaLayerNormContinuous chunks the other way round
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_key_map(depth):
    """{original key prefix: diffusers key prefix} for everything that is a plain rename. The fused qkv
    and the swapped (shift, scale) halves are handled in sd3_from_diffusers / sd3_to_diffusers."""
    m = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    for i in range(depth):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        m |= {
            f"{o}.x_block.attn.ln_q": f"{d}.attn.norm_q",
            f"{o}.x_block.attn.ln_k": f"{d}.attn.norm_k",
            f"{o}.x_block.attn.proj": f"{d}.attn.to_out.0",
            f"{o}.x_block.attn2.ln_q": f"{d}.attn2.norm_q",
            f"{o}.x_block.attn2.ln_k": f"{d}.attn2.norm_k",
            f"{o}.x_block.attn2.proj": f"{d}.attn2.to_out.0",
            f"{o}.x_block.adaLN_modulation.1": f"{d}.norm1.linear",
            f"{o}.x_block.mlp.fc1": f"{d}.ff.net.0.proj",
            f"{o}.x_block.mlp.fc2": f"{d}.ff.net.2",
            f"{o}.context_block.attn.ln_q": f"{d}.attn.norm_added_q",
            f"{o}.context_block.attn.ln_k": f"{d}.attn.norm_added_k",
            f"{o}.context_block.attn.proj": f"{d}.attn.to_add_out",
            f"{o}.context_block.adaLN_modulation.1": f"{d}.norm1_context.linear",
            f"{o}.context_block.mlp.fc1": f"{d}.ff_context.net.0.proj",
            f"{o}.context_block.mlp.fc2": f"{d}.ff_context.net.2",
        }
    return m


SD3_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def _swapped(key, depth):
    # tensors stored as (scale, shift) by diffusers: final norm and the last (pre-only) context block
    return key.startswith("final_layer.adaLN_modulation.1.") or key.startswith(
        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1."
    )


def sd3_from_diffusers(sd, depth):
    """diffusers SD3Transformer2DModel state dict -> our (Stability) keys. Every diffusers key must be
    consumed exactly once, otherwise it is reported as unexpected by the strict check."""
    inv = {d: o for o, d in sd3_key_map(depth).items()}
    out, used = {}, set()
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if k == "pos_embed.pos_embed":
            out["pos_embed"] = v
        elif stem in inv:
            o = f"{inv[stem]}.{leaf}"
            out[o] = _swap_halves(v) if _swapped(o, depth) else v
        else:
            continue
        used.add(k)
    for i in range(depth):
        for ours, (q, kk, vv) in SD3_QKV.items():
            for leaf in ("weight", "bias"):
                parts = [f"transformer_blocks.{i}.{n}.{leaf}" for n in (q, kk, vv)]
                if all(p in sd for p in parts):
                    out[f"joint_blocks.{i}.{ours}.{leaf}"] = torch.cat([sd[p] for p in parts])
                    used.update(parts)
    out.update({f"<diffusers>.{k}": v for k, v in sd.items() if k not in used})  # surfaces as unexpected
    return out


def sd3_lora_names(cfg, name):
    # our adapted module -> its diffusers module(s), one per adapter chunk: a fused qkv splits into q, k, v
    if name.endswith("qkv"):
        i, rest = name.split(".", 2)[1:]
        return [f"transformer_blocks.{i}.{n}" for n in SD3_QKV[rest]]
    return [sd3_key_map(cfg.depth)[name]]


# ----------------------------------------------------------------------------------------------------
# FLUX.1 Kontext [dev] (and FLUX.1 [dev], the same network: text-to-image is Kontext without a reference).
# BFL flux/model.py, modules/layers.py, math.py; diffusers transformer_flux.py. Module names are BFL's keys.


@dataclass
class FluxConfig:
    depth: int = 19  # double-stream blocks (separate image / text weights, joint attention)
    depth_single: int = 38  # single-stream blocks (one weight set over the [text, image] sequence)
    hidden: int = 3072  # width D = heads * head_dim
    heads: int = 24
    in_channels: int = 64  # packed token width = latent channels * 2*2; the output has the same
    context_dim: int = 4096  # text token width (T5-XXL)
    pooled_dim: int = 768  # CLIP-L pooler_output (un-projected)
    axes_dim: tuple = (16, 56, 56)  # RoPE dims per id axis (index, row, col); sums to head_dim
    theta: int = 10000  # RoPE base
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # bias on the double blocks' qkv (every released FLUX.1)
    guidance_embed: bool = True  # guidance-distilled (dev, Kontext-dev); False for schnell
    pref_dim: int = 0  # number of objectives M (0: plain base model)


FLUX_PRESETS = {
    "flux-dev": dict(),  # FLUX.1 [dev] and FLUX.1 Kontext [dev]: same shapes, same keys (BFL util.py configs)
    # CPU default: a 32x32 RGB image space-to-depth'ed 2x2 (F.pixel_unshuffle -> [12, 16, 16]) packs to 8x8 = 64
    # tokens of 48 features: sd35-tiny's token grid and token width (patch 4 on RGB), so its CPU budget carries
    # over. Head dim 32 with BFL's axis proportions (1/8, 7/16, 7/16 of 128 -> 16, 56, 56), which is what
    # flux_config_from_state reads back from a bare state dict (RoPE axes are not in the tensor shapes).
    "flux-tiny": dict(
        depth=2, depth_single=2, hidden=64, heads=2, in_channels=48, context_dim=64, pooled_dim=64, axes_dim=(4, 14, 14)
    ),
}


def flux_pack(x):
    # unpacked latent [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C], feature c*4 + ph*2 + pw (BFL sampling.py:41)
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def flux_ids(index, h, w, device=None):
    # ids [h*w, 3] of a packed h x w token grid, raster order: (index, row, col); index 0 = target, 1 = Kontext
    # reference (BFL sampling.py prepare_kontext; diffusers pipeline_flux_kontext.py:560-571, 663)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.full_like(rows, index), rows, cols], -1).flatten(0, 1)


def flux_rope(ids, axes_dim, theta):
    # ids [L, 3] -> cos, sin [L, head_dim/2], one angle per interleaved pair (2i, 2i+1): axis a owns axes_dim[a]/2
    # pairs, angle pos_a * theta^(-2i/d_a) (BFL math.py rope). Angles in float64, tables in fp32, as diffusers'
    # FluxPosEmbed (transformer_flux.py:500-526); BFL's fp32 angles differ by ~1e-7 relative.
    ang = []
    for a, d in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # [d/2]
        ang.append(ids[:, a, None].double() * freqs)  # [L, d/2]
    ang = torch.cat(ang, -1)
    return ang.cos().float(), ang.sin().float()


class MLPEmbedder(nn.Module):
    # BFL MLPEmbedder (layers.py:52): in_layer - SiLU - out_layer
    def __init__(self, din, dim):
        super().__init__()
        self.in_layer, self.out_layer = Linear(din, dim), Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    # BFL Modulation (layers.py:113): lin(SiLU(vec)) [B, n*D] -> its n named [B, D] chunks (MOD's first n)
    def __init__(self, dim, n):
        super().__init__()
        self.lin = Linear(dim, n * dim)

    def forward(self, vec):
        return chunks(self.lin(F.silu(vec)), MOD[: self.lin.out_features // self.lin.in_features])


class RMSScale(nn.Module):
    # only the weight of BFL's RMSNorm (key `scale` [head_dim]); the norm itself runs in kernels.qk_norm_rope
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    # per-head RMSNorm of q and k (eps 1e-6, fp32 as BFL layers.py:63-84), then the interleaved RoPE
    def __init__(self, head_dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSScale(head_dim), RMSScale(head_dim)

    def forward(self, q, k, cos, sin):  # q, k [B, L, H, Dh]; cos, sin [L, Dh/2]
        return kernels.qk_norm_rope(q, k, self.query_norm.scale, self.key_norm.scale, cos, sin, 1e-6, interleaved=True)


class FluxSelfAttention(nn.Module):
    # one stream's attention weights in a double block (BFL SelfAttention): qkv [3D, D], norm, proj [D, D]
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.heads = heads
        self.qkv, self.norm, self.proj = Linear(dim, 3 * dim, bias=bias), QKNorm(dim // heads), Linear(dim, dim)

    def qkv_heads(self, x, cos, sin):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b l h d", three=3, h=self.heads)
        return (*self.norm(q, k, cos, sin), v)


def flux_mlp(dim, hidden):  # keys .0 / .2 (BFL's nn.Sequential)
    return nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """BFL DoubleStreamBlock (layers.py:129-191): image and text streams with their own weights, one joint
    attention over [text, image] with RoPE; the slider vector m joins the image stream's MLP residual."""

    def __init__(self, cfg):
        super().__init__()
        D, mlp = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(D, 6), Modulation(D, 6)
        self.img_attn = FluxSelfAttention(D, cfg.heads, cfg.qkv_bias)
        self.txt_attn = FluxSelfAttention(D, cfg.heads, cfg.qkv_bias)
        self.img_mlp, self.txt_mlp = flux_mlp(D, mlp), flux_mlp(D, mlp)

    @staticmethod
    def stream_out(x, o, mod, attn, mlp, m=None):
        # x += gate * proj(o); x += gate_mlp * (mlp(LN(x) * (1 + scale_mlp) + shift_mlp) + m)
        x, h = kernels.gated_residual_modulate(x, mod.gate_msa, attn.proj(o), mod.shift_mlp, mod.scale_mlp, 1e-6)
        return kernels.gated_residual(x, mod.gate_mlp, mlp(h), m)

    def forward(self, txt, img, vec, cos, sin, m=None):
        L = txt.shape[1]  # cos, sin cover [text, image] in that order
        tmod, imod = self.txt_mod(vec), self.img_mod(vec)
        qt, kt, vt = self.txt_attn.qkv_heads(
            kernels.modulate(txt, tmod.shift_msa, tmod.scale_msa, 1e-6), cos[:L], sin[:L]
        )
        qi, ki, vi = self.img_attn.qkv_heads(
            kernels.modulate(img, imod.shift_msa, imod.scale_msa, 1e-6), cos[L:], sin[L:]
        )
        o = attention(*(torch.cat(heads_first(a, b), 2) for a, b in ((qt, qi), (kt, ki), (vt, vi))))
        txt = fp16_clip(self.stream_out(txt, o[:, :L], tmod, self.txt_attn, self.txt_mlp))
        return txt, self.stream_out(img, o[:, L:], imod, self.img_attn, self.img_mlp, m)


class SingleStreamBlock(nn.Module):
    """BFL SingleStreamBlock (layers.py:194-239): parallel attention + MLP over x = [text, image] tokens. linear1
    [3D + mlp, D] = q | k | v | mlp-in; linear2 [D, D + mlp] reads [attention out, GELU(mlp-in)]."""

    def __init__(self, cfg):
        super().__init__()
        D, self.heads, self.mlp_hidden = cfg.hidden, cfg.heads, int(cfg.hidden * cfg.mlp_ratio)
        self.linear1, self.linear2 = Linear(D, 3 * D + self.mlp_hidden), Linear(D + self.mlp_hidden, D)
        self.hidden = D
        self.norm = QKNorm(D // cfg.heads)
        self.modulation = Modulation(D, 3)

    def forward(self, x, vec, cos, sin, m=None, m_range=None):
        mod = self.modulation(vec)
        h = kernels.modulate(x, mod.shift_msa, mod.scale_msa, 1e-6)
        qkv, mlp = self.linear1(h).split([3 * self.hidden, self.mlp_hidden], -1)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b l h d", three=3, h=self.heads)
        o = attention(*heads_first(*self.norm(q, k, cos, sin), v))
        y = self.linear2(torch.cat([o, F.gelu(mlp, approximate="tanh")], -1))
        return fp16_clip(kernels.gated_residual(x, mod.gate_msa, y, m, m_range))  # m on the image tokens m_range only


def fp16_clip(x):
    # in fp16 only: FLUX's text stream (double blocks) and joint stream (single blocks) outgrow fp16's range;
    # diffusers clips them to it (transformer_flux.py:408-409, 494-495), and so do we
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformer(Backbone):
    """FLUX.1 Kontext [dev] / FLUX.1 [dev]. forward(x [B,C,h,w], sigma [B], context [B,L,4096], pooled [B,768],
    guidance [B] raw scale (e.g. 2.5), ref [B,C,hr,wr] | None, pref [B,M] | None) -> v [B,C,h,w] (diffusers'
    output at timestep = sigma). x and ref are unpacked latents (h, w even); packing, position ids, the
    [text, target, reference] order and slicing the reference tokens off happen inside."""

    name = "flux-kontext"
    # both streams' attention in the double blocks; single blocks' fused linear1 (q | k | v | mlp-in) and linear2
    lora_targets = {
        "img_attn.qkv": (1, 1, 1),
        "txt_attn.qkv": (1, 1, 1),
        "img_attn.proj": (1,),
        "txt_attn.proj": (1,),
        "linear1": (1, 1, 1, 4),
        "linear2": (1,),
    }

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg, D = cfg, cfg.hidden
        if sum(cfg.axes_dim) != D // cfg.heads or any(d % 2 for d in cfg.axes_dim):
            raise ValueError(f"RoPE axes {cfg.axes_dim} must be even and sum to the head dim {D // cfg.heads}")
        if cfg.mlp_ratio != 4.0:  # every FLUX.1; diffusers and the linear1 LoRA split (1, 1, 1, 4) assume it
            raise ValueError(f"unsupported mlp_ratio {cfg.mlp_ratio} (FLUX.1 uses 4.0)")
        self.img_in, self.txt_in = Linear(cfg.in_channels, D), Linear(cfg.context_dim, D)
        self.time_in, self.vector_in = MLPEmbedder(256, D), MLPEmbedder(cfg.pooled_dim, D)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, D)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(D, 1, cfg.in_channels)  # BFL LastLayer: same (shift, scale) layout as SD3's
        self.init_preference()

    def check_inputs(self, x, context, pooled, guidance, ref):
        C = self.cfg.in_channels // 4
        for name, t in (("x", x), ("ref", ref)):
            if t is not None and (t.dim() != 4 or t.shape[1] != C or t.shape[2] % 2 or t.shape[3] % 2):
                raise ValueError(
                    f"{name} must be an unpacked latent [B, {C}, h, w] with h, w even, got {list(t.shape)}"
                )
        if ref is not None and ref.shape[0] != x.shape[0]:
            raise ValueError(f"ref batch {ref.shape[0]} != x batch {x.shape[0]}")
        if context.dim() != 3 or context.shape[-1] != self.cfg.context_dim:
            raise ValueError(f"context must be [B, L, {self.cfg.context_dim}], got {list(context.shape)}")
        if pooled.dim() != 2 or pooled.shape[-1] != self.cfg.pooled_dim:
            raise ValueError(f"pooled must be [B, {self.cfg.pooled_dim}], got {list(pooled.shape)}")
        if self.cfg.guidance_embed and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (dev / Kontext-dev): pass guidance [B], e.g. 2.5")

    def rope(self, L, h, w, ref_hw, device):
        # cos, sin [L + h*w (+ reference tokens), head_dim/2] over [text, target, reference]: text ids 0, the target's
        # (0, row, col), the reference's (1, row, col)
        ids = [torch.zeros(L, 3, dtype=torch.long, device=device), flux_ids(0, h, w, device)]
        if ref_hw is not None:
            ids.append(flux_ids(1, *ref_hw, device))
        return flux_rope(torch.cat(ids), self.cfg.axes_dim, self.cfg.theta)

    def forward(self, x, sigma, context, pooled, guidance=None, ref=None, pref=None):
        self.check_inputs(x, context, pooled, guidance, ref)
        dt = self.compute_dtype  # inputs cast once, here (sigma and guidance feed fp32 timestep embeddings)
        x, context, pooled, ref = x.to(dt), context.to(dt), pooled.to(dt), None if ref is None else ref.to(dt)
        B, _, H, W = x.shape
        img = flux_pack(x) if ref is None else torch.cat([flux_pack(x), flux_pack(ref)], 1)  # Kontext: the reference's
        L, N = context.shape[1], (H // 2) * (W // 2)  # tokens follow the target's, with id index 1, never noised
        ref_hw = None if ref is None else (ref.shape[2] // 2, ref.shape[3] // 2)
        cos, sin = self.tables((L, H, W, ref_hw, x.device), lambda: self.rope(L, H // 2, W // 2, ref_hw, x.device))
        img = self.img_in(img)
        # vec: time_in(emb(1000 t)) + guidance_in(emb(1000 g)) + vector_in(pooled) (BFL model.py:98-104)
        vec = self.time_in(timestep_embedding(1000 * sigma).to(img.dtype))
        if self.cfg.guidance_embed:  # without the embedding (schnell) guidance is ignored, as BFL does
            g = torch.as_tensor(guidance, dtype=torch.float32, device=x.device).expand(B)  # [B] (a scalar is fine)
            vec = vec + self.guidance_in(timestep_embedding(1000 * g).to(img.dtype))
        vec = vec + self.vector_in(pooled)
        dvec, m = self.preference(pref, B, vec.dtype)
        if dvec is not None:
            vec = vec + dvec
        txt = self.txt_in(context)
        for blk in self.double_blocks:
            txt, img = self.run(blk, txt, img, vec, cos, sin, m)
        x_joint = torch.cat([txt, img], 1)  # [B, L + N + N_ref, D]
        for blk in self.single_blocks:  # the slider reaches the image part (target and reference tokens)
            x_joint = self.run(blk, x_joint, vec, cos, sin, m, (L, x_joint.shape[1]))
        out = self.final_layer(x_joint[:, L : L + N], vec)  # target tokens only: [B, N, 4C]
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=H // 2, ph=2, pw=2)


def flux_config_from_diffusers(c):
    known = (
        "patch_size in_channels out_channels num_layers num_single_layers attention_head_dim num_attention_heads "
        "joint_attention_dim pooled_projection_dim guidance_embeds axes_dims_rope"
    )
    check_options(c, "FluxTransformer2DModel", known)
    if c.get("patch_size", 1) != 1:
        raise ValueError(f"unsupported patch_size {c['patch_size']} (FLUX packs 2x2 outside the model: patch_size 1)")
    cin = c.get("in_channels", 64)
    if c.get("out_channels") not in (None, cin) or cin % 4:
        raise ValueError(
            f"unsupported in/out channels {cin}/{c.get('out_channels')} (Fill/Depth/Canny-style "
            "channel-concat models are not implemented; in_channels must be 4 x latent channels)"
        )
    return FluxConfig(
        depth=c.get("num_layers", 19),
        depth_single=c.get("num_single_layers", 38),
        hidden=c.get("num_attention_heads", 24) * c.get("attention_head_dim", 128),
        heads=c.get("num_attention_heads", 24),
        in_channels=cin,
        context_dim=c.get("joint_attention_dim", 4096),
        pooled_dim=c.get("pooled_projection_dim", 768),
        axes_dim=tuple(c.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=bool(c.get("guidance_embeds", False)),
    )


def flux_config_from_state(sd, meta=None):
    # Architecture from tensor shapes (BFL util.py configs). The RoPE axes are not in the shapes: BFL's
    # (16, 56, 56) for head dim 128, the same proportions (1/8, 7/16, 7/16) for other multiples of 32.
    D, cin = sd["img_in.weight"].shape
    if sd["final_layer.linear.weight"].shape[0] != cin:
        raise ValueError(
            f"img_in takes {cin} channels but final_layer gives {sd['final_layer.linear.weight'].shape[0]}"
            ": a Fill/Depth/Canny-style channel-concat model, not implemented"
        )
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim % 32:
        raise ValueError(f"head dim {head_dim}: the RoPE axes cannot be inferred (BFL's layout needs a multiple of 32)")
    count = lambda p: len({k.split(".")[1] for k in sd if k.startswith(p)})
    return FluxConfig(
        depth=count("double_blocks."),
        depth_single=count("single_blocks."),
        hidden=D,
        heads=D // head_dim,
        in_channels=cin,
        context_dim=sd["txt_in.weight"].shape[1],
        pooled_dim=sd["vector_in.in_layer.weight"].shape[1],
        axes_dim=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
        mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / D,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def flux_module_map(cfg):
    """{our module: diffusers module, or a tuple of them for a fused tensor (concatenated along the output)} for
    every weight-holding module (diffusers single_file_utils.py:2294-2488,
    convert_flux_transformer_checkpoint_to_diffusers). Our qk norms
    (`*_norm`, tensor `scale`) are diffusers' RMSNorms (tensor `weight`)."""
    e = "time_text_embed."
    m = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }  # (shift, scale) here, (scale, shift) there
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embed:
        embedders["guidance_in"] = "guidance_embedder"
    for ours, theirs in embedders.items():
        m.update({f"{ours}.in_layer": f"{e}{theirs}.linear_1", f"{ours}.out_layer": f"{e}{theirs}.linear_2"})
    for i in range(cfg.depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        m |= {
            f"{o}.img_mod.lin": f"{d}.norm1.linear",
            f"{o}.txt_mod.lin": f"{d}.norm1_context.linear",
            f"{o}.img_attn.qkv": tuple(f"{d}.attn.to_{c}" for c in "qkv"),
            f"{o}.txt_attn.qkv": tuple(f"{d}.attn.add_{c}_proj" for c in "qkv"),
            f"{o}.img_attn.norm.query_norm": f"{d}.attn.norm_q",
            f"{o}.img_attn.norm.key_norm": f"{d}.attn.norm_k",
            f"{o}.txt_attn.norm.query_norm": f"{d}.attn.norm_added_q",
            f"{o}.txt_attn.norm.key_norm": f"{d}.attn.norm_added_k",
            f"{o}.img_attn.proj": f"{d}.attn.to_out.0",
            f"{o}.txt_attn.proj": f"{d}.attn.to_add_out",
            f"{o}.img_mlp.0": f"{d}.ff.net.0.proj",
            f"{o}.img_mlp.2": f"{d}.ff.net.2",
            f"{o}.txt_mlp.0": f"{d}.ff_context.net.0.proj",
            f"{o}.txt_mlp.2": f"{d}.ff_context.net.2",
        }
    for i in range(cfg.depth_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m |= {
            f"{o}.modulation.lin": f"{d}.norm.linear",
            f"{o}.linear1": (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
            f"{o}.norm.query_norm": f"{d}.attn.norm_q",
            f"{o}.norm.key_norm": f"{d}.attn.norm_k",
            f"{o}.linear2": f"{d}.proj_out",
        }
    return m


def _flux_tensors(cfg):
    # (our key, [diffusers keys], swapped halves?) for every tensor the mapping knows
    for o, d in flux_module_map(cfg).items():
        parts = d if isinstance(d, tuple) else (d,)
        leaves = (("scale", "weight"),) if o.endswith("_norm") else (("weight", "weight"), ("bias", "bias"))
        for ours, theirs in leaves:
            yield f"{o}.{ours}", [f"{p}.{theirs}" for p in parts], o == "final_layer.adaLN_modulation.1"


def flux_from_diffusers(sd, cfg):
    """diffusers FluxTransformer2DModel state dict -> our (BFL) keys. Every diffusers key is consumed exactly
    once; the rest is kept under `<diffusers>.` so that the strict check reports it as unexpected."""
    out, used = {}, set()
    for ours, theirs, swap in _flux_tensors(cfg):
        if all(k in sd for k in theirs):
            t = torch.cat([sd[k] for k in theirs]) if len(theirs) > 1 else sd[theirs[0]]
            out[ours] = _swap_halves(t) if swap else t
            used.update(theirs)
    out.update({f"<diffusers>.{k}": v for k, v in sd.items() if k not in used})
    return out


def flux_lora_names(cfg, name):
    # our adapted module -> its diffusers module(s): fused qkv and linear1 split into to_q / to_k / to_v (/ proj_mlp)
    d = flux_module_map(cfg)[name]
    return list(d) if isinstance(d, tuple) else [d]


# ----------------------------------------------------------------------------------------------------
# LTX-2 (Lightricks, the 19B audio + video DiT; HF Lightricks/LTX-2). Lightricks ltx-core model/transformer/*.py;
# diffusers transformer_ltx2.py (0.42.1, line numbers below). Module names are the original checkpoint keys
# (`model.diffusion_model.` stripped); a diffusers folder goes through ltx2_key, a pure rename.


@dataclass
class LTX2Config:
    depth: int = 48  # transformer blocks, each holding both streams
    hidden: int = 4096  # video width D = heads * head_dim (32 x 128)
    heads: int = 32  # video heads; must equal audio_heads (the a2v / v2a time RoPE is split by it)
    audio_hidden: int = 2048  # audio width (32 x 64)
    audio_heads: int = 32
    in_channels: int = 128  # video latent channels = token width (patch 1x1x1); the output has the same
    audio_in_channels: int = 128  # audio token width = audio_channels * mel bins; the output has the same
    audio_channels: int = 8  # audio-latent channels: the latent [B, 8, A, 16] packs to tokens [B, A, 128]
    caption_channels: int = 3840  # text width out of the connectors (Gemma-3-12B hidden)
    cross_attention_dim: int = 4096  # video text cross-attention k/v width = hidden (after caption_projection)
    audio_cross_attention_dim: int = 2048  # audio one = audio_hidden; also the width of the a2v / v2a time RoPE
    rope_type: str = "split"  # "split": pairs (i, i + Dh/2) in each head (2.0 release); "interleaved": (2i, 2i+1)
    rope_theta: float = 10000.0
    rope_double_precision: bool = True  # RoPE frequencies in float64 (metadata frequencies_precision "float64")
    max_pos: tuple = (20, 2048, 2048)  # video RoPE normaliser: seconds, pixels, pixels
    audio_max_pos: tuple = (20,)  # audio RoPE normaliser: seconds
    timestep_scale_multiplier: float = 1000.0  # the timestep embeddings see t = sigma * this
    cross_attn_timestep_scale_multiplier: float = 1000.0  # the a2v / v2a gates see sigma * this (ltx-core's code
    #                                                       default 1 is wrong for 2.0; its metadata says 1000)
    vae_scale_factors: tuple = (8, 32, 32)  # video latent -> pixels: frames, height, width
    causal_offset: int = 1  # the causal VAE's first latent frame is a single pixel frame
    audio_scale_factor: int = 4  # audio latent frame -> mel frames
    audio_sampling_rate: int = 16000  # Hz
    audio_hop_length: int = 160  # samples per mel frame: 100 mel frames per second
    pref_dim: int = 0  # number of objectives M (0: plain base model)


LTX2_PRESETS = {
    "ltx2-19b": dict(),  # LTX-2 [dev] 2.0 (ltx-2-19b-dev.safetensors; diffusers Lightricks/LTX-2 transformer/)
    # tests and a CPU default: 4 heads of 16 (video) and of 8 (audio); audio latent [B, 8, A, 2]
    "ltx2-tiny": dict(depth=2, hidden=64, heads=4, audio_hidden=32, audio_heads=4, in_channels=16, audio_in_channels=16,
                      caption_channels=64, cross_attention_dim=64, audio_cross_attention_dim=32),
}  # fmt: skip

# what LTX2Transformer.forward hands every block (namedtuples: torch.compile traces them): the global modulations
# [B, n*D] of both streams, the a2v / v2a scale-shifts and gates; the four RoPE tables (cos, sin)
LTX2Mod = namedtuple("LTX2Mod", "video audio ca_video ca_audio gate_video gate_audio")
LTX2Tables = namedtuple("LTX2Tables", "video audio ca_video ca_audio")


def ltx2_video_positions(F, h, w, fps, cfg, device=None):
    # [F*h*w, 3] RoPE positions (seconds, pixels, pixels) of the latent voxels in raster order (f, h, w): the
    # midpoint of each voxel's pixel span [start, end); the time span is shifted causally (the first latent frame is
    # one pixel frame: t -> max(0, t + 1 - 8)) and divided by fps (diffusers transformer_ltx2.py:905-928, 1009-1014)
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (F, h, w)), indexing="ij")
    start = torch.stack(grid, -1).flatten(0, 2)  # [T, 3] latent indices
    span = torch.stack([start, start + 1])  # [2, T, 3] pixel bounds: each axis times its scale factor (python scalars:
    span = torch.stack([span[..., i] * f for i, f in enumerate(cfg.vae_scale_factors)], -1)  # no host -> device copy)
    t = (span[..., 0] + cfg.causal_offset - cfg.vae_scale_factors[0]).clamp(min=0) / fps
    span = torch.cat([t[..., None], span[..., 1:]], -1)
    return (span[0] + span[1]) / 2.0


def ltx2_audio_positions(A, cfg, device=None):
    # [A, 1] RoPE positions in seconds: the midpoint of each latent frame's mel span [4i, 4i + 4), shifted causally
    # like the video's, at 100 mel frames per second (transformer_ltx2.py:958-985)
    f = torch.arange(A, dtype=torch.float32, device=device)
    s = cfg.audio_scale_factor
    mel = (torch.stack([f, f + 1]) * s + cfg.causal_offset - s).clamp(min=0)  # [2, A]
    sec = mel * cfg.audio_hop_length / cfg.audio_sampling_rate
    return ((sec[0] + sec[1]) / 2.0)[:, None]


def ltx2_rope(pos, max_pos, dim, heads, theta, double_precision=True):
    """pos [T, n_axes] fp32 -> cos, sin [1, T, heads, dim/(2 heads)] fp32: RoPE over the whole inner dim, each head
    getting its own slice of the frequency list (transformer_ltx2.py:987-1078; ltx-core rope.py)."""
    # The release's arithmetic, in exactly this order (other orders of the same math miss diffusers by 4e-5 to 1e-4
    # relative: angles in float64 7.8e-5, 2*frac*w - w 1.0e-4, theta^x cast to fp32 before * pi/2 3.6e-5):
    #   w = fp32(theta ** linspace(0, 1, n) * pi / 2), computed in float64 (rope_double_precision);
    #   angle = fp32((2 * (pos / max_pos) - 1) * w) on fp32 positions; cos and sin in fp32.
    T, n_axes = pos.shape
    n = dim // (2 * n_axes)  # frequencies per axis
    dt = torch.float64 if double_precision else torch.float32
    w = (theta ** torch.linspace(0.0, 1.0, n, dtype=dt, device=pos.device) * math.pi / 2.0).float()  # [n]
    frac = torch.stack([pos[:, i] / m for i, m in enumerate(max_pos)], -1)  # [T, n_axes] in [0, 1)
    ang = rearrange((frac[..., None] * 2 - 1) * w, "t a k -> t (k a)")  # slots cycle the axes: t, h, w, t, h, w, ...
    pad = dim // 2 - ang.shape[1]  # the slots left over by dim // (2 n_axes) come first, as the identity rotation
    cos = torch.cat([torch.ones(T, pad, device=pos.device), ang.cos()], -1)
    sin = torch.cat([torch.zeros(T, pad, device=pos.device), ang.sin()], -1)
    return tuple(rearrange(t, "t (h d) -> 1 t h d", h=heads) for t in (cos, sin))


class LTX2Attention(nn.Module):
    """ltx-core Attention: q from x, k and v from ctx (x itself in self-attention), RMSNorm of q and k across all
    heads (q_norm, k_norm [H*Dh]), RoPE in each head, SDPA, to_out.0 (transformer_ltx2.py:161-222)."""

    def __init__(self, dim, heads, head_dim, kv_dim=None, interleaved=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.interleaved = heads, interleaved
        self.to_q, self.to_k, self.to_v = Linear(dim, inner), Linear(kv_dim or dim, inner), Linear(kv_dim or dim, inner)
        self.q_norm, self.k_norm = nn.RMSNorm(inner, eps=1e-6), nn.RMSNorm(inner, eps=1e-6)
        self.to_out = nn.ModuleList([Linear(inner, dim)])  # key to_out.0 (ltx-core: Sequential(Linear, Identity))

    def forward(self, x, ctx=None, rope=None, k_rope=None, mask=None):
        # x [B, Lq, D], ctx [B, Lk, Dkv]; rope (cos, sin) [1, L, H, Dh/2] for q and k, or q's only when k_rope is
        # given (a2v / v2a: video time on one side, audio time on the other); mask [B, Lk] (text padding)
        ctx = x if ctx is None else ctx
        q, k, v = (
            rearrange(p(t), "b l (h d) -> b l h d", h=self.heads)
            for p, t in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx))
        )
        qr, kr = rope or (None, None), k_rope or (None, None)
        q, k = kernels.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, *qr, 1e-6, self.interleaved, *kr)
        return self.to_out[0](attention(*heads_first(q, k, v), mask))


class GELUProj(nn.Module):
    # diffusers / ltx-core GELU(approximate="tanh") activation module with its input projection (key `proj`)
    def __init__(self, din, dout):
        super().__init__()
        self.proj = Linear(din, dout)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    # ltx-core / diffusers FeedForward, keys net.0.proj / net.2: GELU-tanh projection, Identity (dropout), Linear
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, mult * dim), nn.Identity(), Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TwoLinear(nn.Module):
    # Linear - act - Linear with keys linear_1 / linear_2: the timestep MLP (SiLU; diffusers TimestepEmbedding) and
    # the caption projection (GELU-tanh; PixArtAlphaTextProjection, embeddings.py:1957)
    def __init__(self, din, dim, act):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = Linear(din, dim), act, Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class AdaLNSingle(nn.Module):
    """PixArt adaLN-single (ltx-core adaln.py; diffusers LTX2AdaLayerNormSingle, transformer_ltx2.py:101-142):
    emb = MLP(sinusoid(t)) [B, D], modulation = linear(SiLU(emb)) [B, n*D]. d_emb (the preference path) joins emb
    before both uses."""

    def __init__(self, dim, n):
        super().__init__()
        self.emb = nn.Module()  # key emb.timestep_embedder (PixArtAlphaCombinedTimestepSizeEmbeddings, no size terms)
        self.emb.timestep_embedder = TwoLinear(256, dim, nn.SiLU())
        self.linear = Linear(dim, n * dim)

    def forward(self, t, dtype, d_emb=None):
        emb = self.emb.timestep_embedder(timestep_embedding(t).to(dtype))
        if d_emb is not None:
            emb = emb + d_emb
        return self.linear(F.silu(emb)), emb


def rms_modulate(x, shift, scale):
    # RMSNorm(x) * (1 + scale) + shift: LTX-2's adaptive norm (no affine)
    return kernels.modulate(x, shift, scale, 1e-6, rms=True)


class LTX2Block(nn.Module):
    """ltx-core BasicAVTransformerBlock (diffusers LTX2VideoTransformerBlock.forward, transformer_ltx2.py:597-811):
    per stream self-attention, text cross-attention, then audio-to-video and video-to-audio attention, then the
    feed-forward. Norms are RMSNorm without affine; the slider vector m joins the video feed-forward residual."""

    def __init__(self, cfg):
        super().__init__()
        D, Da, il = cfg.hidden, cfg.audio_hidden, cfg.rope_type == "interleaved"
        hd, ahd = D // cfg.heads, Da // cfg.audio_heads
        self.attn1 = LTX2Attention(D, cfg.heads, hd, interleaved=il)
        self.audio_attn1 = LTX2Attention(Da, cfg.audio_heads, ahd, interleaved=il)
        self.attn2 = LTX2Attention(D, cfg.heads, hd, cfg.cross_attention_dim)
        self.audio_attn2 = LTX2Attention(Da, cfg.audio_heads, ahd, cfg.audio_cross_attention_dim)
        # both cross-modal attentions work at the audio width with the audio heads: to_q 4096 -> 2048 in a2v
        self.audio_to_video_attn = LTX2Attention(D, cfg.audio_heads, ahd, Da, interleaved=il)  # q video, k/v audio
        self.video_to_audio_attn = LTX2Attention(Da, cfg.audio_heads, ahd, D, interleaved=il)  # q audio, k/v video
        self.ff, self.audio_ff = FeedForward(D), FeedForward(Da)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)  # MOD[:6]
        self.audio_scale_shift_table = nn.Parameter(torch.randn(6, Da) / Da**0.5)
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.randn(5, D) / D**0.5)  # AV_MOD
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.randn(5, Da) / Da**0.5)

    def forward(self, x, a, ctx, actx, mask, mod, rope, m=None):
        # x [B, Tv, D], a [B, Ta, Da]; ctx, actx the projected text; mod: the global modulations [B, n*D] (forward);
        # rope: the four (cos, sin) tables. Global modulation + per-block table, then chunks (l.569-577).
        v = chunks(mod.video + self.scale_shift_table.flatten(), MOD[:6])
        s = chunks(mod.audio + self.audio_scale_shift_table.flatten(), MOD[:6])
        tv = chunks(self.scale_shift_table_a2v_ca_video.flatten(), AV_MOD)  # this block's a2v / v2a rows
        ta = chunks(self.scale_shift_table_a2v_ca_audio.flatten(), AV_MOD)
        cv, ca = chunks(mod.ca_video, AV_MOD[:4]), chunks(mod.ca_audio, AV_MOD[:4])  # the global ones
        # 1. self-attention (l.609-658)
        x = kernels.gated_residual(
            x, v.gate_msa, self.attn1(rms_modulate(x, v.shift_msa, v.scale_msa), rope=rope.video)
        )
        a = kernels.gated_residual(
            a, s.gate_msa, self.audio_attn1(rms_modulate(a, s.shift_msa, s.scale_msa), rope=rope.audio)
        )
        # 2. text cross-attention: plain RMSNorm, no modulation, no gate, no RoPE in 2.0 (l.697-733)
        x = x + self.attn2(F.rms_norm(x, x.shape[-1:], eps=1e-6), ctx, mask=mask)
        a = a + self.audio_attn2(F.rms_norm(a, a.shape[-1:], eps=1e-6), actx, mask=mask)
        # 3. a2v and v2a, both from the states after step 2 (l.735-796); time-only RoPE on both sides
        xa = rms_modulate(x, cv.a2v_shift + tv.a2v_shift, cv.a2v_scale + tv.a2v_scale)  # video, queries of a2v
        ax = rms_modulate(a, ca.a2v_shift + ta.a2v_shift, ca.a2v_scale + ta.a2v_scale)  # audio, keys of a2v
        y_a2v = self.audio_to_video_attn(xa, ax, rope=rope.ca_video, k_rope=rope.ca_audio)
        av = rms_modulate(a, ca.v2a_shift + ta.v2a_shift, ca.v2a_scale + ta.v2a_scale)  # audio, queries of v2a
        va = rms_modulate(x, cv.v2a_shift + tv.v2a_shift, cv.v2a_scale + tv.v2a_scale)  # video, keys of v2a
        y_v2a = self.video_to_audio_attn(av, va, rope=rope.ca_audio, k_rope=rope.ca_video)
        # 4. the step-3 residuals fused with the feed-forward's norm and modulation (l.798-809)
        x, h = kernels.gated_residual_modulate(
            x, mod.gate_video + tv.gate, y_a2v, v.shift_mlp, v.scale_mlp, 1e-6, rms=True
        )
        x = kernels.gated_residual(x, v.gate_mlp, self.ff(h), m)  # m: slider vector (video stream only)
        a, h = kernels.gated_residual_modulate(
            a, mod.gate_audio + ta.gate, y_v2a, s.shift_mlp, s.scale_mlp, 1e-6, rms=True
        )
        return x, kernels.gated_residual(a, s.gate_mlp, self.audio_ff(h))


class LTX2Transformer(Backbone):
    """LTX-2 audio + video DiT. forward(video [B,C,F,h,w], audio [B,Ca,A,M], sigma [B], context [B,L,3840],
    context_audio [B,L,3840], context_mask [B,L] | None, fps, pref [B,M] | None) -> (v_video, v_audio) in the input
    layouts: diffusers' outputs at timestep = 1000 * sigma on the packed tokens. Latents are normalised (per-channel
    VAE statistics applied); contexts are the text connectors' outputs; context_mask (1 attend, 0 padding) masks
    both text cross-attentions. Packing and the RoPE coordinates (from F, h, w, fps and A) happen inside."""

    name = "ltx2"
    # q, k, v, out of all six attentions of a block (video / audio self, video / audio text, a2v, v2a)
    lora_targets = {"to_q": (1,), "to_k": (1,), "to_v": (1,), "to_out.0": (1,)}

    def __init__(self, cfg: LTX2Config):
        super().__init__()
        self.cfg, D, Da = cfg, cfg.hidden, cfg.audio_hidden
        if cfg.heads != cfg.audio_heads:  # ltx-core asserts it: the a2v q table is split by the video head count
            raise ValueError(f"video and audio head counts must be equal, got {cfg.heads} and {cfg.audio_heads}")
        if D % cfg.heads or Da % cfg.audio_heads:
            raise ValueError(f"widths {D}, {Da} must be multiples of the head counts {cfg.heads}, {cfg.audio_heads}")
        if (cfg.cross_attention_dim, cfg.audio_cross_attention_dim) != (D, Da):  # caption_projection feeds attn2
            raise ValueError(
                f"cross-attention dims {cfg.cross_attention_dim}, {cfg.audio_cross_attention_dim} must "
                f"equal the widths {D}, {Da} (LTX-2.0 projects the text to the stream width)"
            )
        if cfg.rope_type not in ("split", "interleaved"):
            raise ValueError(f"unsupported rope_type {cfg.rope_type!r} (supported: 'split', 'interleaved')")
        if cfg.audio_in_channels % cfg.audio_channels:
            raise ValueError(
                f"audio_in_channels {cfg.audio_in_channels} is not audio_channels {cfg.audio_channels} x mel bins"
            )
        self.patchify_proj, self.audio_patchify_proj = Linear(cfg.in_channels, D), Linear(cfg.audio_in_channels, Da)
        self.adaln_single, self.audio_adaln_single = AdaLNSingle(D, 6), AdaLNSingle(Da, 6)
        self.av_ca_video_scale_shift_adaln_single = AdaLNSingle(D, 4)
        self.av_ca_audio_scale_shift_adaln_single = AdaLNSingle(Da, 4)
        self.av_ca_a2v_gate_adaln_single, self.av_ca_v2a_gate_adaln_single = AdaLNSingle(D, 1), AdaLNSingle(Da, 1)
        self.caption_projection = TwoLinear(cfg.caption_channels, D, nn.GELU(approximate="tanh"))
        self.audio_caption_projection = TwoLinear(cfg.caption_channels, Da, nn.GELU(approximate="tanh"))
        self.transformer_blocks = nn.ModuleList(LTX2Block(cfg) for _ in range(cfg.depth))
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)  # output (shift, scale), no swap
        self.audio_scale_shift_table = nn.Parameter(torch.randn(2, Da) / Da**0.5)
        self.proj_out, self.audio_proj_out = Linear(D, cfg.in_channels), Linear(Da, cfg.audio_in_channels)
        self.init_preference()

    def check_inputs(self, video, audio, sigma, context, context_audio, context_mask):
        c = self.cfg
        if video.dim() != 5 or video.shape[1] != c.in_channels:
            raise ValueError(f"video must be a latent [B, {c.in_channels}, F, h, w], got {list(video.shape)}")
        mel = c.audio_in_channels // c.audio_channels
        if audio.dim() != 4 or audio.shape[1] != c.audio_channels or audio.shape[3] != mel:
            raise ValueError(f"audio must be a latent [B, {c.audio_channels}, A, {mel}], got {list(audio.shape)}")
        for name, t in (("context", context), ("context_audio", context_audio)):
            if t.dim() != 3 or t.shape[-1] != c.caption_channels:
                raise ValueError(f"{name} must be [B, L, {c.caption_channels}] (connector output), got {list(t.shape)}")
        if context_mask is not None and context.shape[1] != context_audio.shape[1]:
            raise ValueError(
                f"context_mask masks both contexts: their lengths {context.shape[1]} and "
                f"{context_audio.shape[1]} must be equal"
            )
        names = "video audio sigma context context_audio context_mask".split()
        batches = list(zip(names, (video, audio, sigma, context, context_audio, context_mask)))
        if len({t.shape[0] for _, t in batches if t is not None}) > 1:
            sizes = ", ".join(f"{n} {t.shape[0]}" for n, t in batches if t is not None)
            raise ValueError(f"batch sizes differ: {sizes}")

    def rope(self, F, h, w, A, fps, device):
        # the four (cos, sin) tables: video 3-D and audio 1-D at the stream widths; the a2v / v2a time-only ones at
        # the audio width over max(20 s, 20 s), both split by the video head count (transformer_ltx2.py:1272-1300)
        c = self.cfg
        vpos, apos = ltx2_video_positions(F, h, w, fps, c, device), ltx2_audio_positions(A, c, device)
        table = lambda pos, max_pos, dim: ltx2_rope(pos, max_pos, dim, c.heads, c.rope_theta, c.rope_double_precision)
        ca_max = (max(c.max_pos[0], c.audio_max_pos[0]),)
        return LTX2Tables(
            video=table(vpos, c.max_pos, c.hidden),
            audio=table(apos, c.audio_max_pos, c.audio_hidden),
            ca_video=table(vpos[:, :1], ca_max, c.audio_cross_attention_dim),
            ca_audio=table(apos, ca_max, c.audio_cross_attention_dim),
        )

    def forward(self, video, audio, sigma, context, context_audio, context_mask=None, fps=24.0, pref=None):
        self.check_inputs(video, audio, sigma, context, context_audio, context_mask)
        dt = self.compute_dtype  # inputs cast once, here (sigma feeds fp32 timestep embeddings)
        video, audio, context, context_audio = (t.to(dt) for t in (video, audio, context, context_audio))
        c, (B, _, Fr, h, w), (A, mel) = self.cfg, video.shape, audio.shape[2:]
        x = self.patchify_proj(rearrange(video, "b c f h w -> b (f h w) c"))  # pipeline_ltx2.py _pack_latents, p=1
        a = self.audio_patchify_proj(rearrange(audio, "b c a m -> b a (c m)"))  # feature c*16 + mel (l.727-745)
        rope = self.tables((Fr, h, w, A, float(fps), x.device), lambda: self.rope(Fr, h, w, A, fps, x.device))
        # one sigma for both streams; t on the 0..1000 scale as diffusers receives it. The gates see t * (ca / ts),
        # = t for the release (l.1524-1530, 1568-1600)
        t = c.timestep_scale_multiplier * sigma
        t_gate = t * (c.cross_attn_timestep_scale_multiplier / c.timestep_scale_multiplier)
        d_emb, m = self.preference(pref, B, x.dtype)  # pref_mlp joins the video timestep embedding
        mod_video, emb = self.adaln_single(t, x.dtype, d_emb)
        mod_audio, audio_emb = self.audio_adaln_single(t, a.dtype)
        mod = LTX2Mod(
            video=mod_video,
            audio=mod_audio,
            ca_video=self.av_ca_video_scale_shift_adaln_single(t, x.dtype)[0],
            ca_audio=self.av_ca_audio_scale_shift_adaln_single(t, a.dtype)[0],
            gate_video=self.av_ca_a2v_gate_adaln_single(t_gate, x.dtype)[0],
            gate_audio=self.av_ca_v2a_gate_adaln_single(t_gate, a.dtype)[0],
        )
        ctx, actx = self.caption_projection(context), self.audio_caption_projection(context_audio)
        for blk in self.transformer_blocks:
            x, a = self.run(blk, x, a, ctx, actx, context_mask, mod, rope, m)
        # output: LayerNorm (eps 1e-6, no affine) modulated by table + the embedded timestep (not the linear's
        # output); (shift, scale), no swap (l.1676-1686)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(1)
        x = self.proj_out(kernels.modulate(x, shift, scale, 1e-6))
        shift, scale = (self.audio_scale_shift_table[None] + audio_emb[:, None]).unbind(1)
        a = self.audio_proj_out(kernels.modulate(a, shift, scale, 1e-6))
        return (rearrange(x, "b (f h w) c -> b c f h w", f=Fr, h=h), rearrange(a, "b a (c m) -> b c a m", m=mel))


# Original (ltx-core) key components -> diffusers' (convert_ltx2_transformer_to_diffusers, single_file_utils.py:
# 4151-4221). Every rename is of a whole dot-separated component; all other components are spelled the same.
LTX2_RENAMES = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
}
LTX2_RENAMES_BACK = {d: o for o, d in LTX2_RENAMES.items()}
# a bijection between two disjoint name sets, so ltx2_key(ltx2_key(k), to_diffusers=False) == k for every key
assert len(LTX2_RENAMES_BACK) == len(LTX2_RENAMES) and not set(LTX2_RENAMES) & set(LTX2_RENAMES_BACK)

# the combined file's other components (after `model.diffusion_model.` is stripped, or beside it): text connectors,
# Gemma feature projection, video VAE, audio VAE, vocoder (diffusers single_file_utils.py:4151-4221)
LTX2_BUNDLED = tuple(
    "video_embeddings_connector. audio_embeddings_connector. text_embedding_projection. vae. audio_vae. "
    "vocoder.".split()
)


def ltx2_key(key, to_diffusers=True):
    """The one LTX-2 key mapping: an original (ltx-core) key <-> its diffusers name, component by component."""
    table, other = (LTX2_RENAMES, LTX2_RENAMES_BACK) if to_diffusers else (LTX2_RENAMES_BACK, LTX2_RENAMES)
    parts = key.split(".")
    assert not set(parts) & set(other), f"{key} already has a name of the target side"
    return ".".join(table.get(p, p) for p in parts)


def ltx2_from_diffusers(sd, cfg=None):
    # diffusers LTX2VideoTransformer3DModel state dict -> original keys (unknown keys surface in the strict check)
    return {ltx2_key(k, to_diffusers=False): v for k, v in sd.items()}


# diffusers LTX2VideoTransformer3DModel options this code implements only at one value (LTX-2.3 / 2.5 features)
# fmt: off
LTX2_DIFFUSERS_FIXED = dict(patch_size=1, patch_size_t=1, audio_patch_size=1, audio_patch_size_t=1, gated_attn=False,
                            cross_attn_mod=False, audio_gated_attn=False, audio_cross_attn_mod=False,
                            activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
                            norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                            attention_out_bias=True, use_prompt_embeddings=True, perturbed_attn=False, ff_bias=True,
                            audio_ff_bias=True, use_keyframes_abs_pos_embedding=False)
# fmt: on


def ltx2_config_from_diffusers(c):
    known = (  # use_prompt_adaln_single acts only with cross_attn_mod (a fixed option: LTX-2.3/2.5's features)
        "in_channels out_channels num_attention_heads attention_head_dim cross_attention_dim vae_scale_factors "
        "pos_embed_max_pos base_height base_width audio_in_channels audio_out_channels audio_num_attention_heads "
        "audio_attention_head_dim audio_cross_attention_dim audio_scale_factor audio_pos_embed_max_pos "
        "audio_sampling_rate audio_hop_length num_layers caption_channels rope_theta rope_double_precision "
        "causal_offset timestep_scale_multiplier cross_attn_timestep_scale_multiplier rope_type use_prompt_adaln_single"
    )
    check_options(c, "LTX2VideoTransformer3DModel", known, LTX2_DIFFUSERS_FIXED)
    for ours, theirs in (("in_channels", "out_channels"), ("audio_in_channels", "audio_out_channels")):
        if c.get(theirs) not in (None, c.get(ours, 128)):
            raise ValueError(
                f"{theirs} {c[theirs]} != {ours} {c.get(ours, 128)} (the output is unpacked to the input layout)"
            )
    heads, audio_heads = c.get("num_attention_heads", 32), c.get("audio_num_attention_heads", 32)
    d = LTX2Config()  # fields of the same name in both, cast to our type; absent: diffusers' default (= ours)
    same = "in_channels audio_in_channels caption_channels cross_attention_dim audio_cross_attention_dim rope_theta "
    same += "rope_double_precision timestep_scale_multiplier cross_attn_timestep_scale_multiplier vae_scale_factors "
    same += "causal_offset audio_scale_factor audio_sampling_rate audio_hop_length"
    return LTX2Config(
        **{k: type(getattr(d, k))(c[k]) for k in same.split() if k in c},
        depth=c.get("num_layers", 48),
        hidden=heads * c.get("attention_head_dim", 128),
        heads=heads,
        audio_hidden=audio_heads * c.get("audio_attention_head_dim", 64),
        audio_heads=audio_heads,
        rope_type=c.get("rope_type", "interleaved"),  # diffusers' default; the release's config says "split"
        max_pos=(c.get("pos_embed_max_pos", 20), c.get("base_height", 2048), c.get("base_width", 2048)),
        audio_max_pos=(c.get("audio_pos_embed_max_pos", 20),),
    )


# what only the combined file's metadata says (config -> transformer, ltx-core field names): to_q is square and the
# q/k norms span all heads, so no shape gives the head count; RoPE layout and precision and the a2v gate multiplier
# are not in the weights at all (ltx-core's code defaults for the last two are wrong for 2.0)
LTX2_META_REQUIRED = (
    "num_attention_heads audio_num_attention_heads rope_type frequencies_precision av_ca_timestep_scale_multiplier"
).split()


def ltx2_file_config(meta, need, why):
    # the combined file's config -> transformer (JSON in the safetensors metadata, ltx-core's field names), with the
    # fields `need` present; `why`: what no tensor shape records, for the error
    try:
        t = json.loads((meta or {})["config"])["transformer"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(
            "LTX-2 single file without its config (JSON in the safetensors metadata under 'config' -> "
            f"'transformer', as Lightricks ships it): {why} in no tensor shape"
        ) from None
    missing = [k for k in need if k not in t]
    if missing:
        raise ValueError(f"LTX-2 single file: its config metadata lacks {missing}")
    return t


def ltx2_config_from_state(sd, meta=None):
    # Lightricks' combined file: widths and depth from the tensor shapes, the rest from the metadata
    # (ltx-core model_configurator.py LTXModelConfigurator.from_config)
    t = ltx2_file_config(
        meta, LTX2_META_REQUIRED, "the head count, rope_type, frequency precision and a2v timestep multiplier are"
    )
    if t["frequencies_precision"] not in ("float32", "float64"):
        raise ValueError(f"unsupported frequencies_precision {t['frequencies_precision']!r} ('float32' or 'float64')")
    if not t.get("use_middle_indices_grid", True):
        raise ValueError("unsupported use_middle_indices_grid=False (RoPE at the span starts)")
    D, cin = sd["patchify_proj.weight"].shape
    Da, ain = sd["audio_patchify_proj.weight"].shape
    for width, heads, dim_key in (
        (D, t["num_attention_heads"], "attention_head_dim"),
        (Da, t["audio_num_attention_heads"], "audio_attention_head_dim"),
    ):
        if width % heads or t.get(dim_key, width // heads) * heads != width:
            raise ValueError(
                f"config metadata: {heads} heads x {dim_key} {t.get(dim_key)} != width {width} (patchify_proj)"
            )
    return LTX2Config(
        depth=len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}),
        hidden=D,
        heads=t["num_attention_heads"],
        audio_hidden=Da,
        audio_heads=t["audio_num_attention_heads"],
        in_channels=cin,
        audio_in_channels=ain,
        caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
        cross_attention_dim=sd["transformer_blocks.0.attn2.to_k.weight"].shape[1],
        audio_cross_attention_dim=sd["transformer_blocks.0.audio_attn2.to_k.weight"].shape[1],
        rope_type=t["rope_type"],
        rope_theta=float(t.get("positional_embedding_theta", 10000.0)),
        rope_double_precision=t["frequencies_precision"] == "float64",
        max_pos=tuple(t.get("positional_embedding_max_pos", (20, 2048, 2048))),
        audio_max_pos=tuple(t.get("audio_positional_embedding_max_pos", (20,))),
        timestep_scale_multiplier=float(t.get("timestep_scale_multiplier", 1000)),
        cross_attn_timestep_scale_multiplier=float(t["av_ca_timestep_scale_multiplier"]),
    )


def ltx2_file_metadata(cfg):
    # the inverse of ltx2_config_from_state: a combined file's safetensors metadata for cfg, in ltx-core's field names
    # (how the tiny default caches its base, so it loads like a release file)
    t = dict(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.hidden // cfg.heads,
        audio_num_attention_heads=cfg.audio_heads,
        audio_attention_head_dim=cfg.audio_hidden // cfg.audio_heads,
        rope_type=cfg.rope_type,
        frequencies_precision="float64" if cfg.rope_double_precision else "float32",
        positional_embedding_theta=cfg.rope_theta,
        positional_embedding_max_pos=list(cfg.max_pos),
        audio_positional_embedding_max_pos=list(cfg.audio_max_pos),
        timestep_scale_multiplier=cfg.timestep_scale_multiplier,
        av_ca_timestep_scale_multiplier=cfg.cross_attn_timestep_scale_multiplier,
        use_middle_indices_grid=True,
    )
    return {"config": json.dumps({"transformer": t})}


# ----------------------------------------------------------------------------------------------------
# LTX-2 text connectors (diffusers pipelines/ltx2/connectors.py): Gemma-3's 49 stacked hidden states -> the two text
# contexts the DiT cross-attends to. Lightricks ltx-core text_encoders/gemma (feature extractor +
# Embeddings1DConnector); diffusers pipelines/ltx2/connectors.py (0.42.1, line numbers below). Module names are the
# combined file's keys (`model.diffusion_model.` stripped where present); a diffusers `connectors/` folder goes through
# ltx2_connector_key.


@dataclass
class LTX2ConnectorConfig:
    caption_channels: int = 3840  # Gemma-3-12B hidden width = each connector's width = the output width
    text_layers: int = 49  # stacked hidden states: the embeddings + 48 layers
    heads: int = 30  # video connector: heads * head_dim must equal caption_channels
    head_dim: int = 128
    depth: int = 2  # connector blocks
    registers: int = 128  # learnable registers replacing the padding; the text length must be a multiple of it
    audio_heads: int = 30  # the audio connector, same layout
    audio_head_dim: int = 128
    audio_depth: int = 2
    audio_registers: int = 128
    rope_type: str = "split"  # as the DiT: "split" for the 2.0 release
    rope_theta: float = 10000.0
    rope_double_precision: bool = True
    rope_max_pos: int = 4096  # token positions 0..L-1 are normalised by this "base sequence length"


def ltx2_text_valid(mask, L):
    # mask [B, L] (1 token, 0 padding) -> the token counts [B]. The padding must be on the left, as LTX-2's Gemma
    # tokenizer pads (pipeline_ltx2.py:303-360): the feature norm takes the last n positions as the tokens (l.47-54)
    n = mask.sum(-1).long()
    if not torch.equal(mask.bool(), torch.arange(L, device=mask.device)[None] >= L - n[:, None]):
        raise ValueError(
            "text mask must be left-padded 0/1 (padding first, then the tokens), as Gemma's tokenizer pads for LTX-2"
        )
    return n


def ltx2_text_features(h, n, scale=8.0, eps=1e-6):
    """Gemma's stacked hidden states h [B, L, C, N], left-padded with n [B] tokens at the end -> [B, L, C*N]
    (flattened c-major, as aggregate_embed's input): every layer of every sample normalised over its tokens and all C
    channels, (h - mean) / (max - min) * 8, then the padding zeroed (connectors.py:13-77 per_layer_masked_mean_norm).
    In fp32 (diffusers: the input dtype, bf16 in its pipeline)."""
    B, L, C, _ = h.shape
    h = h.float()
    valid = (torch.arange(L, device=h.device)[None] >= L - n[:, None])[:, :, None, None]  # [B, L, 1, 1]
    mean = h.masked_fill(~valid, 0.0).sum((1, 2), keepdim=True) / (n.view(B, 1, 1, 1) * C + eps)  # [B, 1, 1, N]
    lo = h.masked_fill(~valid, math.inf).amin((1, 2), keepdim=True)
    hi = h.masked_fill(~valid, -math.inf).amax((1, 2), keepdim=True)
    return ((h - mean) / (hi - lo + eps) * scale).masked_fill(~valid, 0.0).flatten(2)


class LTX2ConnectorBlock(nn.Module):
    """ltx-core BasicTransformerBlock1D (diffusers LTX2TransformerBlock1d, connectors.py:174-215): pre-norm
    self-attention with the 1-D RoPE, then the feed-forward; RMSNorm without affine, no modulation."""

    def __init__(self, dim, heads, interleaved):
        super().__init__()
        self.attn1 = LTX2Attention(dim, heads, dim // heads, interleaved=interleaved)
        self.ff = FeedForward(dim)

    def forward(self, x, rope):
        x = x + self.attn1(F.rms_norm(x, x.shape[-1:], eps=1e-6), rope=rope)
        return x + self.ff(F.rms_norm(x, x.shape[-1:], eps=1e-6))


class LTX2Connector(nn.Module):
    """ltx-core Embeddings1DConnector (diffusers LTX2ConnectorTransformer1d, connectors.py:218-332): the padding is
    replaced by learnable registers, then a few plain transformer blocks with a 1-D split RoPE over the inner dim."""

    def __init__(self, dim, heads, depth, registers, cfg):
        super().__init__()
        self.heads, self.cfg = heads, cfg
        il = cfg.rope_type == "interleaved"
        self.transformer_1d_blocks = nn.ModuleList(LTX2ConnectorBlock(dim, heads, il) for _ in range(depth))
        self.learnable_registers = nn.Parameter(torch.rand(registers, dim) * 2 - 1)  # diffusers' init, U(-1, 1)

    def forward(self, x, n):
        # x [B, L, D] the projected text, n [B] tokens at the end of each row. The tokens move to the front in order
        # and position p >= n takes register p mod R (the table tiled over L), so no padding is left and attention
        # needs no mask (l.288-318: a stable argsort of the mask; for left padding a rotation by L - n)
        B, L, _ = x.shape
        R = self.learnable_registers.shape[0]
        if L % R:
            raise ValueError(
                f"text length {L} must be a multiple of the connector's {R} registers (LTX-2 pads to 1024)"
            )
        pos = torch.arange(L, device=x.device)
        src = (pos[None] + L - n[:, None]) % L  # [B, L]: front position p takes token p + L - n
        front = x.gather(1, src[..., None].expand_as(x))
        registers = self.learnable_registers.repeat(L // R, 1).to(x.dtype)  # [L, D]
        x = torch.where((pos[None] < n[:, None])[..., None], front, registers)
        c = self.cfg  # RoPE over positions 0..L-1 normalised by rope_max_pos (l.111-171): the DiT's table with one axis
        rope = ltx2_rope(
            pos[:, None].float(), (c.rope_max_pos,), x.shape[-1], self.heads, c.rope_theta, c.rope_double_precision
        )
        for blk in self.transformer_1d_blocks:
            x = blk(x, rope)
        return F.rms_norm(x, x.shape[-1:], eps=1e-6)


class LTX2TextConnectors(nn.Module):
    """forward(hidden_states [B, L, C, N] (Gemma's N stacked hidden states, left-padded), mask [B, L]) ->
    (context [B, L, C], context_audio [B, L, C], mask [B, L] all ones): what LTX2Transformer takes as context,
    context_audio and context_mask (connectors.py:399-478, the 2.0 branch). The per-layer norm and aggregate_embed are
    shared; each stream has its own connector."""

    def __init__(self, cfg: LTX2ConnectorConfig):
        super().__init__()
        self.cfg, C = cfg, cfg.caption_channels
        for name, heads, head_dim in (("", cfg.heads, cfg.head_dim), ("audio_", cfg.audio_heads, cfg.audio_head_dim)):
            if heads * head_dim != C:  # aggregate_embed's output feeds both connectors
                raise ValueError(f"{name}connector width {heads} x {head_dim} must equal caption_channels {C}")
        if cfg.rope_type not in ("split", "interleaved"):
            raise ValueError(f"unsupported rope_type {cfg.rope_type!r} (supported: 'split', 'interleaved')")
        self.text_embedding_projection = nn.Module()  # key text_embedding_projection.aggregate_embed
        self.text_embedding_projection.aggregate_embed = Linear(C * cfg.text_layers, C, bias=False)
        self.video_embeddings_connector = LTX2Connector(C, cfg.heads, cfg.depth, cfg.registers, cfg)
        self.audio_embeddings_connector = LTX2Connector(C, cfg.audio_heads, cfg.audio_depth, cfg.audio_registers, cfg)

    def forward(self, hidden_states, mask):
        c, proj = self.cfg, self.text_embedding_projection.aggregate_embed
        if hidden_states.dim() != 4 or hidden_states.shape[2:] != (c.caption_channels, c.text_layers):
            raise ValueError(
                f"hidden_states must be [B, L, {c.caption_channels}, {c.text_layers}] (all Gemma hidden "
                f"states stacked), got {list(hidden_states.shape)}"
            )
        if mask.shape != hidden_states.shape[:2]:
            raise ValueError(f"mask must be [B, L] = {list(hidden_states.shape[:2])}, got {list(mask.shape)}")
        n = ltx2_text_valid(mask, mask.shape[1])
        x = proj(ltx2_text_features(hidden_states, n).to(proj.weight.dtype))
        # diffusers multiplies the video context by the connector's output mask, all ones once registers fill the
        # padding (l.469-474): the DiT's text attention is then unmasked
        return self.video_embeddings_connector(x, n), self.audio_embeddings_connector(x, n), torch.ones_like(mask)


# Original (ltx-core) key components -> diffusers' (scripts/convert_ltx2_to_diffusers.py
# LTX_2_0_TEXT_ENCODER_RENAME_DICT, get_text_encoder_keys_from_combined_ckpt); aggregate_embed is text_proj_in
LTX2_CONNECTOR_RENAMES = {
    "video_embeddings_connector": "video_connector",
    "audio_embeddings_connector": "audio_connector",
    "transformer_1d_blocks": "transformer_blocks",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
}
LTX2_CONNECTOR_RENAMES_BACK = {d: o for o, d in LTX2_CONNECTOR_RENAMES.items()}
LTX2_CONNECTOR_PROJ = ("text_embedding_projection.aggregate_embed.", "text_proj_in.")


def ltx2_connector_key(key, to_diffusers=True):
    """The one connector key mapping: an original key <-> its diffusers LTX2TextConnectors name."""
    src, dst = LTX2_CONNECTOR_PROJ if to_diffusers else LTX2_CONNECTOR_PROJ[::-1]
    if key.startswith(src):
        return dst + key[len(src) :]
    table = LTX2_CONNECTOR_RENAMES if to_diffusers else LTX2_CONNECTOR_RENAMES_BACK
    return ".".join(table.get(p, p) for p in key.split("."))


# diffusers LTX2TextConnectors options implemented at one value only (LTX-2.3 features, or untested paths)
LTX2_CONNECTOR_FIXED = dict.fromkeys(
    "per_modality_projections proj_bias video_gated_attn audio_gated_attn causal_temporal_positioning".split(), False
)


def ltx2_connector_config_from_diffusers(c):
    known = "caption_channels text_proj_in_factor connector_rope_base_seq_len rope_theta rope_double_precision "
    known += "rope_type video_hidden_dim audio_hidden_dim"
    each = ("num_attention_heads", "attention_head_dim", "num_layers", "num_learnable_registers")
    known += "".join(f" {s}_connector_{k}" for s in ("video", "audio") for k in each)
    keys = [f"{s}_connector_num_learnable_registers" for s in ("video", "audio")]
    bad = [f"{k}=None (only a count: the masked connector is not implemented)" for k in keys if k in c and c[k] is None]
    check_options(c, "LTX2TextConnectors", known, LTX2_CONNECTOR_FIXED, bad)
    defaults = dict(heads=("num_attention_heads", 30), head_dim=("attention_head_dim", 128), depth=("num_layers", 2))
    defaults["registers"] = ("num_learnable_registers", 128)  # the video and the audio connector alike:
    each = lambda s: {ours: c.get(f"{s}_connector_{k}", d) for ours, (k, d) in defaults.items()}
    return LTX2ConnectorConfig(
        caption_channels=c.get("caption_channels", 3840),
        text_layers=c.get("text_proj_in_factor", 49),
        **each("video"),
        **{f"audio_{k}": v for k, v in each("audio").items()},
        rope_type=c.get("rope_type", "interleaved"),
        rope_theta=float(c.get("rope_theta", 1e4)),
        rope_double_precision=bool(c.get("rope_double_precision", True)),
        rope_max_pos=c.get("connector_rope_base_seq_len", 4096),
    )


def ltx2_connector_config_from_state(sd, meta=None):
    # Lightricks' combined file: widths, depths and register counts from the shapes; from the metadata (config ->
    # transformer, ltx-core's Embeddings1DConnectorConfigurator): the head counts (ltx-core's defaults 30 x 128 where
    # absent), the RoPE layout and precision, and the base length, whose ltx-core default [1] is not the release's
    need = ("rope_type", "frequencies_precision", "connector_positional_embedding_max_pos")
    t = ltx2_file_config(meta, need, "the connectors' RoPE layout, precision and base length are")
    if t.get("connector_apply_gated_attention", False):
        raise ValueError("unsupported connector_apply_gated_attention=True (LTX-2.3 connectors)")
    C, CN = sd["text_embedding_projection.aggregate_embed.weight"].shape
    depth = lambda s: len(
        {k.split(".")[2] for k in sd if k.startswith(f"{s}_embeddings_connector.transformer_1d_blocks.")}
    )
    regs = lambda s: sd[f"{s}_embeddings_connector.learnable_registers"].shape[0]
    heads, head_dim = t.get("connector_num_attention_heads", 30), t.get("connector_attention_head_dim", 128)
    return LTX2ConnectorConfig(
        caption_channels=C,
        text_layers=CN // C,
        heads=heads,
        head_dim=head_dim,
        depth=depth("video"),
        registers=regs("video"),
        audio_heads=t.get("audio_connector_num_attention_heads", heads),
        audio_head_dim=t.get("audio_connector_attention_head_dim", head_dim),
        audio_depth=depth("audio"),
        audio_registers=regs("audio"),
        rope_type=t["rope_type"],
        rope_double_precision=t["frequencies_precision"] == "float64",
        rope_max_pos=t["connector_positional_embedding_max_pos"][0],
    )


def load_ltx2_connectors(path, dtype=torch.float32, device="cpu"):
    """The text connectors from a diffusers folder (connectors/ with config.json, class LTX2TextConnectors; or a repo
    root holding connectors/) or Lightricks' combined .safetensors (only the connector tensors are read); strict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config, _, sd, path = ltx2_component(path, "connectors", "LTX2TextConnectors", None, ltx2_connector_key)
        cfg = ltx2_connector_config_from_diffusers(config)
    elif os.path.isfile(path):
        dm = "model.diffusion_model."
        ours = ("video_embeddings_connector.", "audio_embeddings_connector.", "text_embedding_projection.")
        sd, meta = read_safetensors(path, keep=lambda k: k.removeprefix(dm).startswith(ours))
        sd = {k.removeprefix(dm): v for k, v in sd.items()}  # aggregate_embed may sit outside the prefix
        need = [
            "text_embedding_projection.aggregate_embed.weight",
            "video_embeddings_connector.learnable_registers",
            "audio_embeddings_connector.learnable_registers",
        ]
        if any(k not in sd for k in need):
            raise ValueError(f"{path}: not LTX-2 text connectors (lacks {[k for k in need if k not in sd]})")
        cfg = ltx2_connector_config_from_state(sd, meta)
    else:
        raise FileNotFoundError(f"no such checkpoint: {path}")
    net = assign_checkpoint(lambda: LTX2TextConnectors(cfg), sd, dtype, device, what=f"{path} (text connectors)")
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# VAE (SD3.5 / FLUX 16-channel AutoencoderKL)
# The LDM autoencoder (Rombach et al. 2022, ldm/modules/diffusionmodules/model.py) as SD3 and FLUX ship it: 16 latent
# channels, 8x downsampling, one single-head attention in the middle, no quant convs. Same layout as Stability's
# sd3_impls.py SDVAE and BFL's flux/modules/autoencoder.py. Attribute names ARE the original checkpoint keys, so the
# `first_stage_model.` part of a Stability single file (or BFL's ae.safetensors) loads as a plain dict; a diffusers
# `vae/` folder goes through `vae_key_from_diffusers`.

# z = (mean - shift) * scaling puts latents where the transformer was trained (sd3_impls.py:271-282; flux util.py).
VAE_SD3 = dict(scaling=1.5305, shift=0.0609)
VAE_FLUX = dict(scaling=0.3611, shift=0.1159)


def vae_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class VAEResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = vae_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = vae_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        # a 1x1 conv only where the width changes; Identity has no weights, so no key
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = vae_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        height = x.shape[2]
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # one head of width C: scale 1/sqrt(C)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=height))


class VAEMidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = VAEResnetBlock(channels, channels, groups)
        self.attn_1 = VAEAttnBlock(channels, groups)
        self.block_2 = VAEResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEDownsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, so 2k pixels give exactly k


class VAEUpsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAELevel(nn.Module):
    """One resolution level: n resnets `block.j` (block(cin, cout) for the first, block(cout, cout) after), then a 2x
    `downsample` (encoder) or `upsample` (decoder) module if given. The Identity stand-ins have no weights, so they add
    no keys. The 16-channel VAE and LTX-2's audio VAE share it."""

    def __init__(self, cin, cout, n, block, downsample=None, upsample=None):
        super().__init__()
        self.block = nn.ModuleList(block(cin if j == 0 else cout, cout) for j in range(n))
        self.downsample = downsample or nn.Identity()
        self.upsample = upsample or nn.Identity()

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return self.upsample(self.downsample(x))


class VAEEncoder(nn.Module):
    def __init__(self, channels, layers, latent, groups):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        c, block = channels, lambda a, b: VAEResnetBlock(a, b, groups)
        self.down = nn.ModuleList(
            VAELevel(c[max(i - 1, 0)], c[i], layers, block, VAEDownsample(c[i]) if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = VAEMidBlock(channels[-1], groups)
        self.norm_out = vae_norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class VAEDecoder(nn.Module):
    def __init__(self, channels, layers, latent, groups):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv2d(latent, channels[-1], 3, padding=1)
        self.mid = VAEMidBlock(channels[-1], groups)
        # up[i] is indexed by resolution level like down[i] (0 = full size) but runs deepest-first; one more resnet
        # per level than the encoder, and every level but the full-size one doubles the resolution at its end.
        c, block = channels, lambda a, b: VAEResnetBlock(a, b, groups)
        self.up = nn.ModuleList(
            VAELevel(c[min(i + 1, n - 1)], c[i], layers + 1, block, None, VAEUpsample(c[i]) if i else None)
            for i in range(n)
        )
        self.norm_out = vae_norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """Images [B,3,H,W] in [0,1] <-> latents [B,latent,H/f,W/f] scaled and shifted as the transformer expects
    (f = 2**(levels-1), 8 for the released VAEs)."""

    def __init__(self, channels=(128, 256, 512, 512), layers=2, latent=16, groups=32, scaling=1.5305, shift=0.0609):
        super().__init__()
        self.config = dict(
            channels=tuple(channels), layers=layers, latent=latent, groups=groups, scaling=scaling, shift=shift
        )
        self.scaling, self.shift = scaling, shift
        self.encoder = VAEEncoder(channels, layers, latent, groups)
        self.decoder = VAEDecoder(channels, layers, latent, groups)

    def encode(self, img, sample=False, generator=None):
        mean, logvar = self.encoder(2 * img - 1).chunk(2, dim=1)  # the autoencoder works on [-1, 1]
        if sample:  # draw from the posterior N(mean, exp(logvar)), clamped as LDM's DiagonalGaussianDistribution
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean - self.shift) * self.scaling

    def decode(self, z):
        img = self.decoder(z / self.scaling + self.shift)
        return ((img + 1) / 2).clamp(0, 1)


def vae_key_from_diffusers(key, levels):
    """diffusers AutoencoderKL key -> original LDM key: the inverse of diffusers' convert_ldm_vae_checkpoint
    (loaders/single_file_utils.py:1510). The attention's linear -> 1x1 conv reshape is done by the caller."""
    part, name, *rest = key.split(".")  # part: encoder / decoder
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    levels_name = {"down_blocks": "down", "up_blocks": "up"}
    resample = {"downsamplers": "downsample", "upsamplers": "upsample"}
    if part not in ("encoder", "decoder") or not rest:
        raise ValueError(f"unknown diffusers VAE key {key}")
    if name in ("conv_in", "conv_out") and len(rest) == 1:
        return key
    if name == "conv_norm_out" and len(rest) == 1:
        return f"{part}.norm_out.{rest[0]}"
    if name in levels_name:
        # diffusers lists decoder levels deepest-first, LDM by resolution: up_blocks.0 is up.{levels-1}
        i = int(rest[0]) if name == "down_blocks" else levels - 1 - int(rest[0])
        if len(rest) == 5 and rest[1] == "resnets" and rest[3] in resnet:
            return f"{part}.{levels_name[name]}.{i}.block.{rest[2]}.{resnet[rest[3]]}.{rest[4]}"
        if len(rest) == 5 and rest[1] in resample and rest[2:4] == ["0", "conv"]:
            return f"{part}.{levels_name[name]}.{i}.{resample[rest[1]]}.conv.{rest[4]}"
    if name == "mid_block" and len(rest) == 4 and rest[0] == "resnets" and rest[2] in resnet:
        return f"{part}.mid.block_{int(rest[1]) + 1}.{resnet[rest[2]]}.{rest[3]}"
    if name == "mid_block" and rest[:2] == ["attentions", "0"] and rest[2] in attn:
        if len(rest) == 4 and rest[2] != "to_out" or len(rest) == 5 and rest[2:4] == ["to_out", "0"]:
            return f"{part}.mid.attn_1.{attn[rest[2]]}.{rest[-1]}"
    raise ValueError(f"unknown diffusers VAE key {key}")


def vae_from_diffusers(sd, levels):
    """A diffusers AutoencoderKL state dict in original keys; the only 2-D weights are the attention's linears,
    which the original stores as 1x1 convs [C, C, 1, 1]."""
    return {vae_key_from_diffusers(k, levels): t[:, :, None, None] if t.ndim == 2 else t for k, t in sd.items()}


def _vae_config_from_diffusers(config, file):
    required = {  # option: (diffusers' default when config.json omits it, the only value implemented here)
        "_class_name": ("AutoencoderKL", "AutoencoderKL"),
        "in_channels": (3, 3),
        "out_channels": (3, 3),
        "act_fn": ("silu", "silu"),
        "use_quant_conv": (True, False),
        "use_post_quant_conv": (True, False),
        "mid_block_add_attention": (True, True),
        "latents_mean": (None, None),
        "latents_std": (None, None),
    }
    for opt, (default, want) in required.items():
        if config.get(opt, default) != want:
            raise ValueError(
                f"{file}: unsupported VAE option {opt}={config.get(opt, default)!r} (only the 16-channel "
                f"SD3/FLUX AutoencoderKL is implemented, which has {opt}={want!r})"
            )
    n = len(config["block_out_channels"])
    other = lambda key, kind: list(config.get(key, [kind] * n)) != [kind] * n
    if other("down_block_types", "DownEncoderBlock2D") or other("up_block_types", "UpDecoderBlock2D"):
        raise ValueError(
            f"{file}: unsupported VAE block types {config.get('down_block_types')}, {config.get('up_block_types')}"
        )
    return dict(
        channels=tuple(config["block_out_channels"]),
        layers=config["layers_per_block"],
        latent=config["latent_channels"],
        groups=config["norm_num_groups"],
        scaling=config["scaling_factor"],
        shift=config.get("shift_factor") or 0.0,
    )


def _vae_config_from_shapes(sd, file):
    """Architecture from tensor shapes of an original-format state dict (norm groups are not in the shapes)."""
    for key in ("quant_conv.weight", "post_quant_conv.weight"):
        if key in sd:
            raise ValueError(
                f"{file}: has {key}: a 4-channel SD1/SDXL-style VAE with quant convs is not supported, "
                "only the 16-channel SD3/FLUX AutoencoderKL"
            )
    for key in ("encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"):
        if key not in sd:
            raise ValueError(
                f"{file}: missing VAE key {key} (not an LDM-format AutoencoderKL? for diffusers weights "
                "pass the vae/ folder with its config.json)"
            )
    channels, layers = [], 0
    while f"encoder.down.{len(channels)}.block.0.conv1.weight" in sd:
        channels.append(sd[f"encoder.down.{len(channels)}.block.0.conv1.weight"].shape[0])
    while f"encoder.down.0.block.{layers}.conv1.weight" in sd:
        layers += 1
    return dict(channels=tuple(channels), layers=layers, latent=sd["decoder.conv_in.weight"].shape[1])


# what load_vae skips unread in a combined file: other components of Stability's and of Lightricks' bundles
VAE_BUNDLED = ("model.diffusion_model.", *BUNDLED[1:], "audio_vae.", "vocoder.", "text_embedding_projection.")
LTX2_VAE_SIGNATURE = "per_channel_statistics.mean-of-means"  # after `vae.`; the 16-channel VAE has no statistics


def _no_ltx2_vae_options(where, shift, groups):
    if shift is not None or groups is not None:
        raise ValueError(
            f"{where}: an LTX-2 video VAE (per-channel latent statistics, no GroupNorm) takes no shift or groups"
        )


def load_vae(path, dtype=torch.float32, device="cpu", scaling=None, shift=None, groups=None):
    """path: a diffusers vae/ folder, a diffusers repo root holding vae/, or one .safetensors file (Stability single
    file with first_stage_model.* keys, possibly bundling the transformer and text encoders, or BFL's
    ae.safetensors with bare keys). scaling/shift override config.json; a single file carries none, so there they
    are required: **VAE_SD3 or **VAE_FLUX (a Stability-style first_stage_model.* bundle does not tell SD3 from a
    FLUX repack). groups overrides GroupNorm's 32 for a single file.
    LTX-2's video VAE (LTX2VideoVAE) loads from the same places: a diffusers folder of class AutoencoderKLLTX2Video, or
    Lightricks' combined file (its vae.* tensors only) or a bare one; its per-channel statistics are in the weights
    (scaling may still override the release's 1.0)."""
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "vae")):
        path = os.path.join(path, "vae")
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in VAE folder {path}")
        raw = read_json(config_file)
        if raw.get("_class_name") == "AutoencoderKLLTX2Video":
            _no_ltx2_vae_options(path, shift, groups)
            cfg = ltx2_vae_config_from_diffusers(raw, config_file)
            return load_ltx2_vae(
                ltx2_vae_from_diffusers(read_diffusers_folder(path)[1], cfg), cfg, path, dtype, device, scaling
            )
        config = _vae_config_from_diffusers(raw, config_file)
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
        sd = vae_from_diffusers(read_safetensors(file)[0], len(config["channels"]))
    else:
        file = path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"VAE weights not found: {file} (expected a diffusers vae/ folder, a repo root "
                "holding vae/, or a .safetensors file)"
            )
        # a bundle's transformer, text encoders, audio VAE and vocoder are never read
        sd = read_safetensors(file, keep=lambda k: not k.startswith(VAE_BUNDLED))[0]
        if LTX2_VAE_SIGNATURE in sd or "vae." + LTX2_VAE_SIGNATURE in sd:
            _no_ltx2_vae_options(file, shift, groups)
            if "vae." + LTX2_VAE_SIGNATURE in sd:  # Lightricks' combined file
                sd = {k[len("vae.") :]: t for k, t in sd.items() if k.startswith("vae.")}
            return load_ltx2_vae(sd, ltx2_vae_config_from_state(sd), file, dtype, device, scaling)
        if any(k.startswith("first_stage_model.") for k in sd):  # a bundle: take only the VAE
            sd = {k[len("first_stage_model.") :]: t for k, t in sd.items() if k.startswith("first_stage_model.")}
        config = dict(_vae_config_from_shapes(sd, file), groups=32)
        if scaling is None or shift is None:
            raise ValueError(
                f"{file}: a single-file VAE has no latent scaling/shift: pass them, "
                "load_vae(path, **model.VAE_SD3) for SD3.5 or load_vae(path, **model.VAE_FLUX) for FLUX"
            )
    config.update({k: v for k, v in dict(scaling=scaling, shift=shift, groups=groups).items() if v is not None})
    vae = assign_checkpoint(lambda: AutoencoderKL(**config), sd, dtype, device, what=f"{file} (VAE {config})")
    return vae.eval().requires_grad_(False)  # frozen here; gradients still flow to the inputs (e.g. reward backprop)


# ----------------------------------------------------------------------------------------------------
# LTX-2 video VAE (diffusers autoencoder_kl_ltx2.py): video [B, 3, 8k+1, H, W] <-> latents [B, 128, k+1, H/32, W/32].
# Lightricks ltx-core model/video_vae; diffusers autoencoder_kl_ltx2.py (0.42.1, line numbers below). Module names are
# the combined file's `vae.*` keys: encoder and decoder are flat lists of stages (resnet groups, resamplers, the mid
# group) as in ltx-core; a diffusers `vae/` folder goes through ltx2_vae_from_diffusers. Norms are parameter-free
# per-pixel RMS norms; every conv is 3x3x3 with its time padding done by repeating edge frames.

LTX2_STRIDES = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}  # (time, height, width)


@dataclass
class LTX2VAEConfig:
    patch: int = 4  # pixels are patchified 4 x 4 first: 3 -> 48 channels ordered (c, p_w, p_h)
    latent: int = 128  # latent channels
    enc_width: tuple = (128, 256, 512, 1024, 2048)  # resnet width of each encoder stage, the last the mid group
    #                                                 (diffusers' conv_in outputs latent_channels: stage 0 is 128 wide)
    enc_layers: tuple = (4, 6, 6, 2, 2)  # resnets per encoder stage
    enc_down: tuple = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")  # the downsampler after stage i
    dec_width: tuple = (1024, 512, 256, 128)  # decoder: the mid group's width, then each stage's after its upsampler
    dec_layers: tuple = (5, 5, 5, 5)  # resnets: the mid group, then per stage
    dec_up: tuple = ("spatiotemporal",) * 3  # the upsampler before decoder stage i + 1
    dec_residual: tuple = (True, True, True)  # the upsamplers' parameter-free skip (depth-to-space of the input)
    encoder_causal: bool = True  # time padding: k-1 copies of the first frame before ...
    decoder_causal: bool = False  # ... or one copy of each edge frame on its side (the 2.0 release decoder)
    enc_padding: str = "zeros"  # spatial padding of the convs
    dec_padding: str = "reflect"
    scaling: float = 1.0  # z = (mean - latents_mean) * scaling / latents_std (pipeline_ltx2.py:687-704)

    @property
    def factors(self):  # (time, space) compression: 8 and 32 for the release
        t = [LTX2_STRIDES[k] for k in self.enc_down]
        return math.prod(s[0] for s in t), self.patch * math.prod(s[1] for s in t)


def pixel_rms_norm(x, eps=1e-8):
    # diffusers PerChannelRMSNorm (l.30-60): every voxel's channel vector divided by its RMS, no weights (the audio
    # VAE's LTX2AudioPixelNorm is the same with eps 1e-6)
    return x / torch.sqrt(torch.mean(x**2, dim=1, keepdim=True) + eps)


class CausalConv3d(nn.Module):
    """ltx-core CausalConv3d (diffusers LTX2VideoCausalConv3d, l.63-111): a 3x3x3 conv, the spatial padding by the conv
    (zeros or reflect), the time padding by repeated edge frames: causal = two copies of the first frame before, else
    one copy of each edge frame on its side. Frame count unchanged."""

    def __init__(self, cin, cout, padding_mode, causal):
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv3d(cin, cout, 3, padding=(0, 1, 1), padding_mode=padding_mode)

    def forward(self, x):
        first, last = x[:, :, :1], x[:, :, -1:]
        return self.conv(torch.cat([first, first, x] if self.causal else [first, x, last], dim=2))


class LTX2VAEResBlock(nn.Module):
    # ltx-core ResnetBlock3D without timestep conditioning or noise injection (diffusers l.114-237); width kept
    def __init__(self, ch, padding_mode, causal):
        super().__init__()
        self.conv1, self.conv2 = (CausalConv3d(ch, ch, padding_mode, causal) for _ in range(2))

    def forward(self, x):
        h = self.conv1(F.silu(pixel_rms_norm(x)))
        return x + self.conv2(F.silu(pixel_rms_norm(h)))


class LTX2VAEStage(nn.Module):
    # ltx-core UNetMidBlock3D: `n` resnets at one width (keys res_blocks.j); a stage of either side and the mid groups
    def __init__(self, ch, n, padding_mode, causal):
        super().__init__()
        self.res_blocks = nn.ModuleList(LTX2VAEResBlock(ch, padding_mode, causal) for _ in range(n))

    def forward(self, x):
        for blk in self.res_blocks:
            x = blk(x)
        return x


def space_to_depth(x, s):
    # [B, C, F*st, H*sh, W*sw] -> [B, C*st*sh*sw, F, H, W], channels (c, st, sh, sw): height before width here
    return rearrange(x, "b c (f st) (h sh) (w sw) -> b (c st sh sw) f h w", st=s[0], sh=s[1], sw=s[2])


def depth_to_space(x, s):
    return rearrange(x, "b (c st sh sw) f h w -> b c (f st) (h sh) (w sw)", st=s[0], sh=s[1], sw=s[2])


class LTX2VAEDown(nn.Module):
    """ltx-core SpaceToDepthDownsample (diffusers LTX2VideoDownsampler3d, l.240-285): conv to cout/s channels, then
    space-to-depth by the stride s, plus a parameter-free skip: the input's space-to-depth averaged over groups of
    cin*s/cout channels. The first st-1 frames are repeated in front, so 2k+1 frames give k+1 (st = 2)."""

    def __init__(self, cin, cout, stride, padding_mode, causal):
        super().__init__()
        self.stride, self.group = stride, cin * math.prod(stride) // cout
        self.conv = CausalConv3d(cin, cout // math.prod(stride), padding_mode, causal)

    def forward(self, x):
        x = torch.cat([x[:, :, : self.stride[0] - 1], x], dim=2)
        skip = rearrange(space_to_depth(x, self.stride), "b (c g) f h w -> b c g f h w", g=self.group).mean(2)
        return space_to_depth(self.conv(x), self.stride) + skip


class LTX2VAEUp(nn.Module):
    """ltx-core DepthToSpaceUpsample (diffusers LTX2VideoUpsampler3d, l.288-338): conv to cout*s channels, then
    depth-to-space by the stride s, dropping the first st-1 frames (k+1 frames give 2k+1); the residual skip is the
    input's depth-to-space with its channels tiled s*cout/cin times."""

    def __init__(self, cin, cout, stride, residual, padding_mode, causal):
        super().__init__()
        self.stride, self.residual, self.repeats = stride, residual, math.prod(stride) * cout // cin
        self.conv = CausalConv3d(cin, cout * math.prod(stride), padding_mode, causal)

    def forward(self, x):
        y = depth_to_space(self.conv(x), self.stride)
        if self.residual:
            y = y + depth_to_space(x, self.stride).repeat(1, self.repeats, 1, 1, 1)
        return y[:, :, self.stride[0] - 1 :]


class LTX2VAEEncoder(nn.Module):
    # patchify, conv_in, [stage, downsampler] per level, the mid group, norm, SiLU, conv_out (diffusers l.687-840)
    def __init__(self, cfg):
        super().__init__()
        w, pad, causal = cfg.enc_width, cfg.enc_padding, cfg.encoder_causal
        self.patch = cfg.patch
        self.conv_in = CausalConv3d(3 * cfg.patch**2, w[0], pad, causal)
        blocks = []
        for i, kind in enumerate(cfg.enc_down):
            blocks += [
                LTX2VAEStage(w[i], cfg.enc_layers[i], pad, causal),
                LTX2VAEDown(w[i], w[i + 1], LTX2_STRIDES[kind], pad, causal),
            ]
        self.down_blocks = nn.ModuleList(blocks + [LTX2VAEStage(w[-1], cfg.enc_layers[-1], pad, causal)])
        self.conv_out = CausalConv3d(w[-1], cfg.latent + 1, pad, causal)  # C means + one log-variance for all C

    def forward(self, x):
        # [B, 3, F, H, W] in [-1, 1] -> [B, C+1, F', H', W']; patch channels (c, p_w, p_h) (l.806-813)
        x = self.conv_in(rearrange(x, "b c f (h ph) (w pw) -> b (c pw ph) f h w", ph=self.patch, pw=self.patch))
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(pixel_rms_norm(x)))


class LTX2VAEDecoder(nn.Module):
    # conv_in, the mid group, [upsampler, stage] per level, norm, SiLU, conv_out, unpatchify (diffusers l.843-1022)
    def __init__(self, cfg):
        super().__init__()
        w, pad, causal = cfg.dec_width, cfg.dec_padding, cfg.decoder_causal
        self.patch = cfg.patch
        self.conv_in = CausalConv3d(cfg.latent, w[0], pad, causal)
        blocks = [LTX2VAEStage(w[0], cfg.dec_layers[0], pad, causal)]
        for i, kind in enumerate(cfg.dec_up):
            blocks += [
                LTX2VAEUp(w[i], w[i + 1], LTX2_STRIDES[kind], cfg.dec_residual[i], pad, causal),
                LTX2VAEStage(w[i + 1], cfg.dec_layers[i + 1], pad, causal),
            ]
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv3d(w[-1], 3 * cfg.patch**2, pad, causal)

    def forward(self, z):
        x = self.conv_in(z)
        for blk in self.up_blocks:
            x = blk(x)
        x = self.conv_out(F.silu(pixel_rms_norm(x)))
        return rearrange(x, "b (c pw ph) f h w -> b c f (h ph) (w pw)", ph=self.patch, pw=self.patch)


class LTX2VideoVAE(nn.Module):
    """Video [B, 3, F, H, W] in [0, 1] (F = 8k+1, H and W multiples of 32) <-> latents [B, 128, k+1, H/32, W/32],
    normalised per channel as LTX2Transformer expects. encode returns the posterior mean."""

    def __init__(self, cfg: LTX2VAEConfig):
        super().__init__()
        self.cfg = cfg
        n_t, n_s = len(cfg.enc_down), len(cfg.dec_up)
        lengths = dict(enc_width=n_t + 1, enc_layers=n_t + 1, dec_width=n_s + 1, dec_layers=n_s + 1, dec_residual=n_s)
        for name, want in lengths.items():
            if (n := len(getattr(cfg, name))) != want:
                raise ValueError(f"LTX2VAEConfig.{name} has {n} entries, needs {want}")
        for kind in (*cfg.enc_down, *cfg.dec_up):
            if kind not in LTX2_STRIDES:
                raise ValueError(f"unsupported resampler {kind!r} (supported: {', '.join(LTX2_STRIDES)})")
        self.encoder, self.decoder = LTX2VAEEncoder(cfg), LTX2VAEDecoder(cfg)
        self.per_channel_statistics = nn.Module()  # keys per_channel_statistics.mean-of-means / std-of-means
        self.per_channel_statistics.register_buffer("mean-of-means", torch.zeros(cfg.latent))
        self.per_channel_statistics.register_buffer("std-of-means", torch.ones(cfg.latent))

    def statistics(self):  # latents_mean, latents_std as [1, C, 1, 1, 1]
        s = self.per_channel_statistics
        return (getattr(s, name).view(1, -1, 1, 1, 1) for name in ("mean-of-means", "std-of-means"))

    def encode(self, video):
        (ft, fs), C = self.cfg.factors, self.cfg.latent
        if video.dim() != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % ft or any(n % fs for n in video.shape[3:]):
            raise ValueError(
                f"video must be [B, 3, F, H, W] with F = {ft}k+1 and H, W multiples of {fs}, got {list(video.shape)}"
            )
        mean, std = self.statistics()
        z = self.encoder(2 * video - 1)[:, :C]  # the posterior mean: the first C of the C+1 channels (l.832-840)
        return (z - mean) * self.cfg.scaling / std

    def decode(self, z):
        if z.dim() != 5 or z.shape[1] != self.cfg.latent:
            raise ValueError(f"latents must be [B, {self.cfg.latent}, F, h, w], got {list(z.shape)}")
        mean, std = self.statistics()
        video = self.decoder(z * std / self.cfg.scaling + mean)
        return ((video + 1) / 2).clamp(0, 1)


# the combined file's statistics that diffusers drops (convert_ltx2_vae_to_diffusers, single_file_utils.py:4257-4260)
LTX2_VAE_UNUSED = ("per_channel_statistics.channel", "per_channel_statistics.mean-of-stds")


def ltx2_vae_key_from_diffusers(key, cfg):
    """diffusers AutoencoderKLLTX2Video key -> original: the inverse of convert_ltx2_vae_to_diffusers
    (single_file_utils.py:4224-4282). ltx-core's lists are flat: encoder down_blocks = [stage 0, downsampler 0, ...,
    mid], decoder up_blocks = [mid, upsampler 0, stage 0, ...]; unknown keys pass through to the strict check."""
    if key in ("latents_mean", "latents_std"):
        return "per_channel_statistics." + {"latents_mean": "mean-of-means", "latents_std": "std-of-means"}[key]
    part, name, *rest = key.split(".") + [""]
    j = None
    if (part, name) == ("encoder", "mid_block"):
        j = 2 * len(cfg.enc_down)
    elif (part, name) == ("decoder", "mid_block"):
        j = 0
    elif name in ("down_blocks", "up_blocks") and rest[0].isdigit():
        i, resampler = int(rest[0]), rest[1:3] in (["downsamplers", "0"], ["upsamplers", "0"])
        j = 2 * i + (part == "decoder") + (not resampler if part == "decoder" else resampler)
        rest = rest[3:] if resampler else rest[1:]
    if j is None:
        return key
    rest = ["res_blocks" if r == "resnets" else r for r in rest[:-1]]
    return ".".join([part, "down_blocks" if part == "encoder" else "up_blocks", str(j), *rest])


def ltx2_vae_from_diffusers(sd, cfg):
    return {ltx2_vae_key_from_diffusers(k, cfg): v for k, v in sd.items()}


def ltx2_vae_config_from_diffusers(c, file):
    # diffusers' lists -> ours: its decoder lists run deepest-first after a reversal, except upsample_type (l.891-900)
    required = {"in_channels": 3, "out_channels": 3, "patch_size_t": 1, "timestep_conditioning": False}
    bad = [f"{k}={c[k]!r} (only {v!r})" for k, v in required.items() if k in c and c[k] != v]
    flags = lambda k, n, default: [c.get(k, default)] * n if isinstance(c.get(k, default), bool) else list(c[k])
    n_down = len(c.get("layers_per_block", (4, 6, 6, 2, 2))) - 1
    n_dec = len(c.get("decoder_layers_per_block", (5,) * 4))
    if not all(flags("spatio_temporal_scaling", n_down, True)) or not all(
        flags("decoder_spatio_temporal_scaling", n_dec - 1, True)
    ):
        bad.append("a level without resampling")
    if any(flags("decoder_inject_noise", n_dec, False)):
        bad.append("decoder_inject_noise")
    if any(t != "LTX2VideoDownBlock3D" for t in c.get("down_block_types", ())):
        bad.append(f"down_block_types={c['down_block_types']}")
    if bad:
        raise ValueError(f"{file}: unsupported AutoencoderKLLTX2Video options: " + ", ".join(bad))
    latent, B = c.get("latent_channels", 128), tuple(c.get("block_out_channels", (256, 512, 1024, 2048)))
    R = tuple(reversed(c.get("decoder_block_out_channels", (256, 512, 1024))))
    U = tuple(reversed(c.get("upsample_factor", (2, 2, 2))))
    dec_width = (R[0], *(r // u for r, u in zip(R, U)))
    if dec_width[:-1] != R:  # otherwise diffusers inserts a width-changing resnet (conv_in) in an up block
        raise ValueError(
            f"{file}: unsupported decoder widths {list(R)} with upsample factors {list(U)} (each level "
            "must take the previous level's output width)"
        )
    return LTX2VAEConfig(
        patch=c.get("patch_size", 4),
        latent=latent,
        enc_width=(latent, *B),
        enc_layers=tuple(c.get("layers_per_block", (4, 6, 6, 2, 2))),
        enc_down=tuple(c.get("downsample_type", LTX2VAEConfig.enc_down)),
        dec_width=dec_width,
        dec_layers=tuple(reversed(c.get("decoder_layers_per_block", (5,) * 4))),
        dec_up=tuple(c.get("upsample_type", LTX2VAEConfig.dec_up)),
        dec_residual=tuple(reversed(flags("upsample_residual", n_dec - 1, True))),
        encoder_causal=c.get("encoder_causal", True),
        decoder_causal=c.get("decoder_causal", True),
        enc_padding=c.get("encoder_spatial_padding_mode", "zeros"),
        dec_padding=c.get("decoder_spatial_padding_mode", "reflect"),
        scaling=float(c.get("scaling_factor", 1.0)),
    )


def ltx2_vae_config_from_state(sd):
    """Architecture from the shapes of an original-format state dict. What no shape holds takes the 2.0 release's value
    (convert_ltx2_to_diffusers.py's "2.0" VAE config): causal encoder, non-causal decoder, zeros / reflect padding,
    residual upsamplers, scaling 1."""

    def levels(part):  # the flat list -> [("stage", n_resnets, width) | ("resample", conv in, conv out)]
        out, j = [], 0
        while any(k.startswith(f"{part}.{j}.") for k in sd):
            n = len({k.split(".")[4] for k in sd if k.startswith(f"{part}.{j}.res_blocks.")})
            w = sd.get(f"{part}.{j}.conv.conv.weight")
            if n:
                out.append(("stage", n, sd[f"{part}.{j}.res_blocks.0.conv1.conv.weight"].shape[0]))
            elif w is not None:
                out.append(("resample", w.shape[1], w.shape[0]))
            else:
                raise ValueError(f"VAE key {part}.{j}.* is neither a resnet group nor a resampler")
            j += 1
        return out

    kinds = {math.prod(s): k for k, s in LTX2_STRIDES.items()}  # 2 temporal, 4 spatial, 8 spatiotemporal

    def resampler(prev, r, nxt, down):  # the stride from the conv's width change between the neighbouring stages
        s = nxt[2] // r[2] if down else r[2] // nxt[2]
        if prev[0] != "stage" or nxt[0] != "stage" or s not in kinds:
            raise ValueError(f"VAE resampler between widths {prev[2]} and {nxt[2]} with conv {r[1]} -> {r[2]}: unknown")
        return kinds[s]

    for key in ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight", "decoder.conv_in.conv.weight"):
        if key not in sd:
            raise ValueError(f"missing LTX-2 VAE key {key}")
    enc, dec = levels("encoder.down_blocks"), levels("decoder.up_blocks")
    if not enc or not dec or len(enc) % 2 == 0 or len(dec) % 2 == 0:
        raise ValueError("LTX-2 VAE: encoder / decoder levels do not alternate resnet groups and resamplers")
    return LTX2VAEConfig(
        patch=math.isqrt(sd["encoder.conv_in.conv.weight"].shape[1] // 3),
        latent=sd["encoder.conv_out.conv.weight"].shape[0] - 1,
        enc_width=tuple(e[2] for e in enc[::2]),
        enc_layers=tuple(e[1] for e in enc[::2]),
        enc_down=tuple(resampler(*enc[i - 1 : i + 2], True) for i in range(1, len(enc), 2)),
        dec_width=tuple(d[2] for d in dec[::2]),
        dec_layers=tuple(d[1] for d in dec[::2]),
        dec_up=tuple(resampler(*dec[i - 1 : i + 2], False) for i in range(1, len(dec), 2)),
        dec_residual=(True,) * (len(dec) // 2),
    )


def load_ltx2_vae(sd, cfg, what, dtype, device, scaling=None):
    # sd: original keys; the statistics diffusers drops are dropped by name here too, anything else is strict
    sd = {k: v for k, v in sd.items() if k not in LTX2_VAE_UNUSED}
    if scaling is not None:
        cfg = replace(cfg, scaling=scaling)
    vae = assign_checkpoint(lambda: LTX2VideoVAE(cfg), sd, dtype, device, what=f"{what} (LTX-2 video VAE)")
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# LTX-2 audio VAE and vocoder (diffusers autoencoder_kl_ltx2_audio.py, pipelines/ltx2/vocoder.py): stereo log-mel
# [B, 2, 4A-3, 64] <-> latents [B, 8, A, 16]
# (25 latent frames/s), and mel -> 24 kHz stereo waveform. Lightricks ltx-core model/audio_vae; diffusers
# models/autoencoders/autoencoder_kl_ltx2_audio.py and pipelines/ltx2/vocoder.py (0.42.1, line numbers below). Module
# names are the combined file's `audio_vae.*` and `vocoder.*` keys; diffusers renames only the statistics
# (convert_ltx2_audio_vae_to_diffusers, single_file_utils.py:4285-4306) and four vocoder names
# (scripts/convert_ltx2_to_diffusers.py LTX_2_0_VOCODER_RENAME_DICT): ltx2_audio_key maps both.
# Implemented: the 2.0 release's options (pixel norms, causal along time, no attention; HiFi-GAN vocoder with
# leaky ReLU); anything else is refused at load time.


@dataclass
class LTX2AudioVAEConfig:
    widths: tuple = (128, 256, 512)  # resnet width per level (base_channels * ch_mult); 3 levels = x4 time and mel
    ch: int = 128  # the encoder's conv_in width (diffusers base_channels)
    num_res_blocks: int = 2  # resnets per encoder level; the decoder has one more per level
    latent: int = 8  # latent channels
    mel_bins: int = 64  # mel bins of the spectrogram; the latent has mel_bins / 4
    in_channels: int = 2  # stereo mel into the encoder ...
    out_channels: int = 2  # ... and out of the decoder
    encoder: bool = True  # a file may hold the decoder only

    @property
    def features(self):  # the packed token width the statistics normalise: 8 channels x 16 mel = 128
        return self.latent * self.mel_bins // 4


class AudioCausalConv2d(nn.Module):
    # diffusers LTX2AudioCausalConv2d (l.31-79) with causality_axis="height": zero padding, all k-1 rows of the time
    # padding before (causal), the mel padding split; shape kept. Key `.conv`
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.pad = ((k - 1) // 2, (k - 1) - (k - 1) // 2, k - 1, 0)  # (mel left, mel right, time before, after)
        self.conv = nn.Conv2d(cin, cout, k)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class LTX2AudioResBlock(nn.Module):
    # diffusers LTX2AudioResnetBlock (l.138-219) without timestep embedding: pixel norm, SiLU, causal 3x3 conv, twice;
    # a causal 1x1 `nin_shortcut` where the width changes
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.conv2 = AudioCausalConv2d(cin, cout), AudioCausalConv2d(cout, cout)
        self.nin_shortcut = AudioCausalConv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(pixel_rms_norm(x, 1e-6)))
        h = self.conv2(F.silu(pixel_rms_norm(h, 1e-6)))
        return self.nin_shortcut(x) + h


class AudioDownsample(nn.Module):
    # diffusers LTX2AudioDownsample (l.222-253): pad 2 rows before in time, 1 column after in mel, 3x3 stride-2 conv:
    # T -> ceil(T/2) causally (4A-3 mel frames -> 2A-1 -> A), 64 mel -> 32
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 2, 0)))


class AudioUpsample(nn.Module):
    # diffusers LTX2AudioUpsample (l.256-284): nearest x2, causal conv, drop the first time row: T -> 2T-1 (A -> 4A-3)
    def __init__(self, ch):
        super().__init__()
        self.conv = AudioCausalConv2d(ch, ch)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))[:, :, 1:]


def audio_mid(ch):  # keys mid.block_1 / mid.block_2 (the release has no mid attention: mid.attn_1 is an Identity)
    mid = nn.Module()
    mid.block_1, mid.block_2 = LTX2AudioResBlock(ch, ch), LTX2AudioResBlock(ch, ch)
    return mid


class LTX2AudioEncoder(nn.Module):
    # diffusers LTX2AudioEncoder (l.319-466): [B, 2, T, 64] -> [B, 2*latent, ceil(T/4), 16], mean then log-variance
    def __init__(self, cfg):
        super().__init__()
        w, n = cfg.widths, len(cfg.widths)
        self.conv_in = AudioCausalConv2d(cfg.in_channels, cfg.ch)
        down = lambda i: AudioDownsample(w[i]) if i < n - 1 else None
        self.down = nn.ModuleList(
            VAELevel(w[i - 1] if i else cfg.ch, w[i], cfg.num_res_blocks, LTX2AudioResBlock, down(i)) for i in range(n)
        )
        self.mid = audio_mid(w[-1])
        self.conv_out = AudioCausalConv2d(w[-1], 2 * cfg.latent)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid.block_2(self.mid.block_1(x))
        return self.conv_out(F.silu(pixel_rms_norm(x, 1e-6)))


class LTX2AudioDecoder(nn.Module):
    # diffusers LTX2AudioDecoder (l.469-665): [B, latent, A, 16] -> [B, 2, 4A-3, 64]; up[i] indexed by level like
    # down[i], run deepest-first. diffusers' final crop / zero-pad to (4A-3, mel_bins) (l.612-663) is a no-op for
    # three levels, which the config enforces
    def __init__(self, cfg):
        super().__init__()
        w, n = cfg.widths, len(cfg.widths)
        self.conv_in = AudioCausalConv2d(cfg.latent, w[-1])
        self.mid = audio_mid(w[-1])
        up = lambda i: AudioUpsample(w[i]) if i else None
        self.up = nn.ModuleList(
            VAELevel(w[min(i + 1, n - 1)], w[i], cfg.num_res_blocks + 1, LTX2AudioResBlock, None, up(i))
            for i in range(n)
        )
        self.conv_out = AudioCausalConv2d(w[0], cfg.out_channels)

    def forward(self, z):
        x = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(pixel_rms_norm(x, 1e-6)))


class LTX2AudioVAE(nn.Module):
    """Log-mel spectrogram [B, 2, T, 64] (16 kHz, hop 160: 100 frames/s) <-> latents [B, 8, A, 16] normalised as
    LTX2Transformer's audio stream expects. The statistics (128 = 8 x 16 entries) act in the DiT's packed
    [B, A, 8*16] token space, feature c*16 + m (pipeline_ltx2.py:707-760, 833, 1623-1626): here as [1, 8, 1, 16].
    encode returns the posterior mean; decode of A latents gives 4A-3 mel frames (causal)."""

    def __init__(self, cfg: LTX2AudioVAEConfig):
        super().__init__()
        if len(cfg.widths) != 3 or cfg.mel_bins % 4:
            raise ValueError(
                f"LTX-2 audio VAE: only 3 levels (x4 compression) and mel_bins a multiple of 4 are "
                f"implemented, got widths {cfg.widths}, mel_bins {cfg.mel_bins}"
            )
        self.cfg = cfg
        if cfg.encoder:
            self.encoder = LTX2AudioEncoder(cfg)
        self.decoder = LTX2AudioDecoder(cfg)
        self.per_channel_statistics = nn.Module()  # keys per_channel_statistics.mean-of-means / std-of-means
        self.per_channel_statistics.register_buffer("mean-of-means", torch.zeros(cfg.features))
        self.per_channel_statistics.register_buffer("std-of-means", torch.ones(cfg.features))

    def statistics(self):  # latents_mean, latents_std: packed [128] -> [1, 8, 1, 16]
        s, c = self.per_channel_statistics, self.cfg
        return (getattr(s, name).view(1, c.latent, 1, c.mel_bins // 4) for name in ("mean-of-means", "std-of-means"))

    def encode(self, mel):
        c = self.cfg
        if not c.encoder:
            raise ValueError("this LTX-2 audio VAE was loaded without its encoder (the checkpoint has none)")
        if mel.dim() != 4 or mel.shape[1] != c.in_channels or mel.shape[3] != c.mel_bins:
            raise ValueError(f"mel must be [B, {c.in_channels}, T, {c.mel_bins}], got {list(mel.shape)}")
        mean, std = self.statistics()
        return (self.encoder(mel)[:, : c.latent] - mean) / std  # DiagonalGaussianDistribution.mean: the first half

    def decode(self, z):
        c = self.cfg
        if z.dim() != 4 or z.shape[1] != c.latent or z.shape[3] != c.mel_bins // 4:
            raise ValueError(f"audio latents must be [B, {c.latent}, A, {c.mel_bins // 4}], got {list(z.shape)}")
        mean, std = self.statistics()
        return self.decoder(z * std + mean)


@dataclass
class LTX2VocoderConfig:
    in_channels: int = 128  # the mel's channels x bins, flattened (c, mel): 2 x 64
    hidden: int = 1024  # conv_pre width; every upsampler halves it
    out_channels: int = 2  # stereo
    upsample_kernels: tuple = (16, 15, 8, 4, 4)
    upsample_rates: tuple = (6, 5, 2, 2, 2)  # product 240: 100 mel frames/s -> 24,000 samples/s
    resblock_kernels: tuple = (3, 7, 11)  # the parallel resblocks after each upsampler, averaged
    resblock_dilations: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    slope: float = 0.1  # leaky ReLU slope inside (the last activation uses PyTorch's default 0.01)
    sample_rate: int = 24000


class HifiResBlock(nn.Module):
    # HiFi-GAN ResBlock1 (diffusers vocoder.py:214-276, leaky ReLU, no anti-aliasing): per dilation d,
    # x += conv2(lrelu(conv1_d(lrelu(x)))), "same" padding; keys convs1.i / convs2.i
    def __init__(self, ch, k, dilations, slope):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(ch, ch, k, dilation=d, padding="same") for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(ch, ch, k, padding="same") for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class LTX2Vocoder(nn.Module):
    """Mel [B, 2, T, 64] (the audio VAE's output) -> waveform [B, 2, 240 T] in [-1, 1] at 24 kHz (diffusers
    LTX2Vocoder, vocoder.py:279-421; ltx-core's HiFi-GAN Vocoder)."""

    def __init__(self, cfg: LTX2VocoderConfig):
        super().__init__()
        if len(cfg.upsample_kernels) != len(cfg.upsample_rates) or len(cfg.resblock_kernels) != len(
            cfg.resblock_dilations
        ):
            raise ValueError(
                "LTX2VocoderConfig: upsample kernels / rates or resblock kernels / dilations differ in length"
            )
        self.cfg, w = cfg, [cfg.hidden // 2**i for i in range(len(cfg.upsample_rates) + 1)]
        self.conv_pre = nn.Conv1d(cfg.in_channels, cfg.hidden, 7, padding=3)
        # (T-1)s - 2(k-s)//2 + k = sT for the release's (k, s) pairs (vocoder.py:338-346)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(w[i], w[i + 1], k, stride=s, padding=(k - s) // 2)
            for i, (k, s) in enumerate(zip(cfg.upsample_kernels, cfg.upsample_rates))
        )
        self.resblocks = nn.ModuleList(
            HifiResBlock(w[i + 1], k, d, cfg.slope)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernels, cfg.resblock_dilations)
        )
        self.conv_post = nn.Conv1d(w[-1], cfg.out_channels, 7, padding=3)

    def forward(self, mel):
        c = self.cfg
        if mel.dim() != 4 or mel.shape[1] * mel.shape[3] != c.in_channels:
            raise ValueError(
                f"mel must be [B, C, T, M] with C*M = {c.in_channels} (stereo x mel bins), got {list(mel.shape)}"
            )
        x = self.conv_pre(rearrange(mel, "b c t m -> b (c m) t"))  # vocoder.py:390-394
        K = len(c.resblock_kernels)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.slope))
            x = torch.stack([self.resblocks[i * K + j](x) for j in range(K)]).mean(0)
        # the last leaky ReLU has PyTorch's default slope 0.01, not c.slope, as the original (vocoder.py:366-369)
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))


# original (ltx-core) key component <-> diffusers' (AutoencoderKLLTX2Audio: only the statistics; LTX2Vocoder: 4 names)
LTX2_AUDIO_RENAMES = {
    "per_channel_statistics.mean-of-means": "latents_mean",
    "per_channel_statistics.std-of-means": "latents_std",
    "conv_pre": "conv_in",
    "conv_post": "conv_out",
    "ups": "upsamplers",
    "resblocks": "resnets",
}
LTX2_AUDIO_RENAMES_BACK = {d: o for o, d in LTX2_AUDIO_RENAMES.items()}


def ltx2_audio_key(key, to_diffusers=True):
    """The one audio VAE / vocoder key mapping: an original key (prefix stripped) <-> its diffusers name. The audio
    VAE's `conv_in` / `conv_out` sit under encoder. / decoder., so the vocoder's top-level renames never touch them."""
    table = LTX2_AUDIO_RENAMES if to_diffusers else LTX2_AUDIO_RENAMES_BACK
    if key in table:
        return table[key]
    head, _, rest = key.partition(".")
    return ".".join([table.get(head, head)] + ([rest] if rest else []))


def ltx2_audio_vae_config_from_diffusers(c, file):
    fixed = dict(
        norm_type="pixel", causality_axis="height", mid_block_add_attention=False, is_causal=True, double_z=True
    )  # the release's values (diffusers' defaults)
    bad = [f"{k}={c[k]!r} (only {v!r})" for k, v in fixed.items() if k in c and c[k] != v]
    if c.get("attn_resolutions"):
        bad.append(f"attn_resolutions={c['attn_resolutions']!r} (only none: no attention)")
    if c.get("mel_bins", 64) is None:
        bad.append("mel_bins=None (only a number)")
    if bad:
        raise ValueError(f"{file}: unsupported AutoencoderKLLTX2Audio options: " + ", ".join(bad))
    base, mult = c.get("base_channels", 128), tuple(c.get("ch_mult", (1, 2, 4)))
    cfg = LTX2AudioVAEConfig(
        widths=tuple(base * m for m in mult),
        ch=base,
        num_res_blocks=c.get("num_res_blocks", 2),
        latent=c.get("latent_channels", 8),
        mel_bins=c.get("mel_bins", 64),
        in_channels=c.get("in_channels", 2),
        out_channels=c.get("output_channels", 2),
    )
    # diffusers sizes latents_mean / latents_std by base_channels (l.745-748) but the pipeline applies them to the
    # packed latent_channels * mel_bins/4 features; the release has 128 = 8 * 16, anything else cannot normalise
    if base != cfg.features:
        raise ValueError(
            f"{file}: base_channels {base} must equal latent_channels x mel_bins/4 = {cfg.features} "
            "(diffusers stores the packed-token statistics with base_channels entries)"
        )
    return cfg


def ltx2_audio_vae_config_from_state(sd, meta=None, file="checkpoint"):
    """Architecture from the shapes of an original-format audio VAE (`audio_vae.` stripped): the widths, resnet counts,
    channels, and mel_bins = 4 x (statistics size) / latent channels. The combined file's metadata (config ->
    audio_vae -> model -> params -> ddconfig, ltx-core's AudioDecoderConfigurator) is checked where present."""
    for key in ("decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight", "per_channel_statistics.mean-of-means"):
        if key not in sd:
            raise ValueError(f"{file}: missing LTX-2 audio VAE key {key}")
    odd = sorted(k for k in sd if ".attn" in k or ".norm" in k)
    if odd:
        raise ValueError(
            f"{file}: audio VAE attention or GroupNorm weights ({odd[0]}, ...) are not implemented "
            "(the release has pixel norms and no attention)"
        )
    widths, n = [], 0
    while f"decoder.up.{len(widths)}.block.0.conv1.conv.weight" in sd:
        widths.append(sd[f"decoder.up.{len(widths)}.block.0.conv1.conv.weight"].shape[0])
    while f"decoder.up.0.block.{n}.conv1.conv.weight" in sd:
        n += 1
    latent, S = sd["decoder.conv_in.conv.weight"].shape[1], sd["per_channel_statistics.mean-of-means"].shape[0]
    encoder = "encoder.conv_in.conv.weight" in sd
    cfg = LTX2AudioVAEConfig(
        widths=tuple(widths),
        num_res_blocks=n - 1,
        latent=latent,
        mel_bins=4 * S // latent,
        out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
        encoder=encoder,
        ch=sd["encoder.conv_in.conv.weight"].shape[0] if encoder else widths[0],
        in_channels=sd["encoder.conv_in.conv.weight"].shape[1] if encoder else 2,
    )
    try:
        dd = json.loads((meta or {})["config"])["audio_vae"]["model"]["params"]["ddconfig"]
    except (KeyError, TypeError, json.JSONDecodeError):
        dd = {}  # ltx-core's defaults: causal along height (time)
    bad = [
        f"{k}={dd[k]!r} (only {v!r})"
        for k, v in (("causality_axis", "height"), ("norm_type", "pixel"), ("mel_bins", cfg.mel_bins))
        if k in dd and dd[k] != v
    ]
    if S % latent or bad:
        raise ValueError(
            f"{file}: unsupported LTX-2 audio VAE: statistics {S} for {latent} latent channels"
            + "".join(", " + b for b in bad)
        )
    return cfg


def ltx2_vocoder_config_from_diffusers(c, file):
    fixed = dict(act_fn="leaky_relu", antialias=False, final_act_fn="tanh", final_bias=True)  # the 2.0 vocoder
    bad = [f"{k}={c[k]!r} (only {v!r})" for k, v in fixed.items() if k in c and c[k] != v]
    if bad:
        raise ValueError(f"{file}: unsupported LTX2Vocoder options: " + ", ".join(bad))
    d = LTX2VocoderConfig()
    return LTX2VocoderConfig(
        in_channels=c.get("in_channels", d.in_channels),
        hidden=c.get("hidden_channels", d.hidden),
        out_channels=c.get("out_channels", d.out_channels),
        upsample_kernels=tuple(c.get("upsample_kernel_sizes", d.upsample_kernels)),
        upsample_rates=tuple(c.get("upsample_factors", d.upsample_rates)),
        resblock_kernels=tuple(c.get("resnet_kernel_sizes", d.resblock_kernels)),
        resblock_dilations=tuple(map(tuple, c.get("resnet_dilations", d.resblock_dilations))),
        slope=float(c.get("leaky_relu_negative_slope", d.slope)),
        sample_rate=c.get("output_sampling_rate", d.sample_rate),
    )


def ltx2_vocoder_config_from_state(sd, meta=None, file="checkpoint"):
    """Widths and kernel sizes from the shapes (`vocoder.` stripped); the upsample rates and dilations are in no
    shape: from the combined file's metadata (config -> vocoder, ltx-core's VocoderConfigurator), else ltx-core's
    defaults, which are the 2.0 release's (diffusers' 2.0 conversion config)."""
    try:
        m = json.loads((meta or {})["config"])["vocoder"]
    except (KeyError, TypeError, json.JSONDecodeError):
        m = {}
    # LTX-2.3's vocoder nests a bandwidth extender and has snake activations with parameters (acts*.alpha / beta)
    if "bwe" in m or m.get("resblock", "1") != "1" or any(".act" in k for k in sd):
        raise ValueError(
            f"{file}: unsupported vocoder (LTX-2.3 BigVGAN / bandwidth extension or snake activations); "
            "only the 2.0 HiFi-GAN vocoder is implemented"
        )
    if "conv_pre.weight" not in sd or "conv_post.weight" not in sd:
        raise ValueError(f"{file}: missing LTX-2 vocoder key conv_pre.weight / conv_post.weight")
    n_up = len({k.split(".")[1] for k in sd if k.startswith("ups.")})
    n_res = len({k.split(".")[1] for k in sd if k.startswith("resblocks.")})
    d = LTX2VocoderConfig()
    rates = tuple(m.get("upsample_rates", d.upsample_rates))
    dil = tuple(map(tuple, m.get("resblock_dilation_sizes", d.resblock_dilations)))
    cfg = LTX2VocoderConfig(
        in_channels=sd["conv_pre.weight"].shape[1],
        hidden=sd["conv_pre.weight"].shape[0],
        out_channels=sd["conv_post.weight"].shape[0],
        upsample_kernels=tuple(sd[f"ups.{i}.weight"].shape[2] for i in range(n_up)),
        upsample_rates=rates,
        resblock_kernels=tuple(sd[f"resblocks.{j}.convs1.0.weight"].shape[2] for j in range(n_res // max(n_up, 1))),
        resblock_dilations=dil,
        sample_rate=m.get("output_sample_rate", d.sample_rate),
    )
    if len(rates) != n_up or len(dil) != len(cfg.resblock_kernels):
        raise ValueError(
            f"{file}: vocoder with {n_up} upsamplers and {len(cfg.resblock_kernels)} resblocks per level "
            f"does not match upsample_rates {list(rates)} / dilations {[list(x) for x in dil]}"
        )
    return cfg


def _component_folder(path, name):  # a diffusers repo root holding name/, or the component folder itself
    return os.path.join(path, name) if os.path.isdir(os.path.join(path, name)) else path


def ltx2_component(path, folder, class_name, prefix, key=ltx2_audio_key, hint=""):
    """One LTX-2 component's tensors under the original names: from a diffusers folder (folder/ of class class_name, or
    a repo root holding it; keys renamed by key(k, to_diffusers=False)) or Lightricks' combined file (its prefix*
    tensors only).
    -> (diffusers config or None, file metadata or None, state dict, the path read)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _component_folder(path, folder)
        config, sd = read_diffusers_folder(path)
        if config.get("_class_name") != class_name:
            raise ValueError(f"{path}: diffusers class {config.get('_class_name')!r}, not {class_name}{hint}")
        return config, None, {key(k, to_diffusers=False): v for k, v in sd.items()}, path
    if os.path.isfile(path):
        sd, meta = read_safetensors(path, keep=lambda k: k.startswith(prefix))
        if not sd:
            raise ValueError(f"{path}: no {prefix}* tensors (not an LTX-2 combined checkpoint)")
        return None, meta, {k[len(prefix) :]: v for k, v in sd.items()}, path
    raise FileNotFoundError(f"no such checkpoint: {path}")


def load_ltx2_audio_vae(path, dtype=torch.float32, device="cpu"):
    """The audio VAE from a diffusers folder (audio_vae/ of class AutoencoderKLLTX2Audio, or a repo root holding it) or
    Lightricks' combined .safetensors (its audio_vae.* tensors only); strict."""
    config, meta, sd, path = ltx2_component(path, "audio_vae", "AutoencoderKLLTX2Audio", "audio_vae.")
    if config is not None:
        cfg = ltx2_audio_vae_config_from_diffusers(config, path)
    else:
        sd = {k: v for k, v in sd.items() if k not in LTX2_VAE_UNUSED}  # statistics diffusers has no buffer for
        cfg = ltx2_audio_vae_config_from_state(sd, meta, path)
    vae = assign_checkpoint(lambda: LTX2AudioVAE(cfg), sd, dtype, device, what=f"{path} (LTX-2 audio VAE)")
    return vae.eval().requires_grad_(False)


def load_ltx2_vocoder(path, dtype=torch.float32, device="cpu"):
    """The vocoder from a diffusers folder (vocoder/ of class LTX2Vocoder, or a repo root holding it) or Lightricks'
    combined .safetensors (its vocoder.* tensors only); strict."""
    config, meta, sd, path = ltx2_component(
        path, "vocoder", "LTX2Vocoder", "vocoder.", hint=" (LTX-2.3's LTX2VocoderWithBWE is not implemented)"
    )
    cfg = ltx2_vocoder_config_from_diffusers(config, path) if config else ltx2_vocoder_config_from_state(sd, meta, path)
    voc = assign_checkpoint(lambda: LTX2Vocoder(cfg), sd, dtype, device, what=f"{path} (LTX-2 vocoder)")
    return voc.eval().requires_grad_(False)


def load_ltx2_audio(path, dtype=torch.float32, device="cpu"):
    """(audio VAE, vocoder) for --audio: from a diffusers repo root (audio_vae/, vocoder/) or the combined file."""
    return load_ltx2_audio_vae(path, dtype, device), load_ltx2_vocoder(path, dtype, device)


# ----------------------------------------------------------------------------------------------------
# The table of backbones: one row each, the only place that lists them. load_transformer finds a diffusers folder's
# row by its config's _class_name and an original single file's by a key only that backbone has; the row says how to
# read the config and map the keys, and holds the facts the other layers read (sample.py's LOADERS and train.py's
# BACKBONES are keyed alike, tests/test_contract.py checks it): the geometry of its latents, whether it makes
# videos, edits a source image, takes guidance as an input.


@dataclass(frozen=True)
class BackboneSpec:
    cls: type  # the Backbone subclass; cls(cfg) builds it
    diffusers_class: str  # config.json "_class_name" of a diffusers folder
    signature: str  # a tensor name that only this backbone's original single file has (after the prefix)
    config_from_diffusers: callable  # config.json dict -> cfg (refusing unsupported options)
    config_from_state: callable  # (original state dict, file metadata) -> cfg, read off the tensor shapes
    from_diffusers: callable  # (diffusers state dict, cfg) -> original keys (unconsumed keys kept, to be reported)
    lora_names: callable  # (cfg, our adapted module) -> its diffusers module(s), one per adapter chunk
    config: type  # its config dataclass; config() is the release's
    presets: dict  # config name -> the config's fields (the releases, the tiny nets)
    tiny: str  # the presets' entry for the CPU default's net
    tokens: callable  # cfg -> (latent cells per token side, the largest token grid side or None)
    vae: tuple  # the release VAE's compression: (frames per latent frame, pixels per latent cell side)
    bundled: tuple = ()  # key prefixes of other components in the same single file, skipped by name
    video: bool = False  # makes clips (latent frames 1 + (frames - 1) / vae[0])
    editing: bool = False  # takes a source image as conditioning (Kontext's reference tokens)
    distilled: bool = False  # guidance is an input of the network (one forward per step), not classifier-free
    guidance: float = 1.0  # sample.py's default --guidance (1: no CFG; a distilled model: its trained input)


BACKBONES = {
    "sd35": BackboneSpec(
        SD3Transformer,
        "SD3Transformer2DModel",
        "joint_blocks.0.x_block.attn.qkv.weight",
        sd3_config_from_diffusers,
        sd3_config_from_state,
        lambda sd, cfg: sd3_from_diffusers(sd, cfg.depth),
        sd3_lora_names,
        SD3Config,
        SD3_PRESETS,
        "sd35-tiny",
        tokens=lambda cfg: (cfg.patch, cfg.pos_embed_max),
        vae=(1, 8),
    ),
    "flux-kontext": BackboneSpec(
        FluxTransformer,
        "FluxTransformer2DModel",
        "double_blocks.0.img_attn.qkv.weight",
        flux_config_from_diffusers,
        flux_config_from_state,
        flux_from_diffusers,
        flux_lora_names,
        FluxConfig,
        FLUX_PRESETS,
        "flux-tiny",
        tokens=lambda cfg: (2, None),  # 2 x 2 latent cells packed per token
        vae=(1, 8),
        editing=True,
        distilled=True,
        guidance=2.5,
    ),
    "ltx2": BackboneSpec(
        LTX2Transformer,
        "LTX2VideoTransformer3DModel",
        "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1.weight",
        ltx2_config_from_diffusers,
        ltx2_config_from_state,
        ltx2_from_diffusers,
        lambda cfg, name: [ltx2_key(name)],  # unfused projections: a pure rename
        LTX2Config,
        LTX2_PRESETS,
        "ltx2-tiny",
        tokens=lambda cfg: (1, None),
        vae=LTX2Config().vae_scale_factors[:2],
        bundled=LTX2_BUNDLED,
        video=True,
    ),
}


def geometry(backbone, tiny=False, pixels=1):
    """-> (the multiple an image side must be, the largest side or None), from the backbone's row: pixels per latent
    cell (the release VAE's, or `pixels` for a tiny pixel-space net) x latent cells per token, up to the token grid's
    largest side where the net has one (SD3's positional table)."""
    spec = BACKBONES[backbone]
    cfg = spec.config(**(spec.presets[spec.tiny] if tiny else {}))
    cells, largest = spec.tokens(cfg)
    side = (pixels if tiny else spec.vae[1]) * cells
    return side, side * largest if largest else None
