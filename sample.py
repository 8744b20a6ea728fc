# Sampling for the rectified-flow backbones: schedules, ODE solvers, prompt encoding, one loader per backbone
# (net + VAE + text encoders + decode, shared with train.py), and a CLI that turns the preference slider ω.
# Read top to bottom; the math is pure functions, loading and the CLI come last.
#   python sample.py --run runs/tiny --prompt "a red circle" --sweep 7 --out strip.png   # any finished run folder
#   python sample.py --backbone sd35 --weights PATH --prompt "a cat" --pref 0.3 --lora adapter.safetensors
#   python sample.py --backbone sd35 --weights PATH --prompt "a cat" --sweep 5 --lora adapter.safetensors
#   python sample.py --backbone ltx2 --weights PATH --prompt "a cat" --pref 0.3 --frames 121 --audio --out clip.webp
import argparse
import base64
import binascii
import json
import math
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Schedules. σ runs from 1 (noise) to 0 (data); x_σ = (1-σ)·x0 + σ·ε.


def time_shift(sigma, shift: float):
    # static shift of SD3 (diffusers scheduling_flow_match_euler_discrete.py:133; sd3_impls.py:23-55)
    return shift * sigma / (1 + (shift - 1) * sigma)


def get_schedule(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    # FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps), scheduling_flow_match_euler_discrete.py:127-144,
    # 336-412: the end point is the *shifted* smallest training sigma, and the linspace between 1 and it is shifted
    # again. Same float32/float64 path as diffusers, so the values agree bit for bit. -> [steps+1], last entry 0.
    sigma_min = time_shift(torch.tensor(1 / num_train_timesteps, dtype=torch.float32), shift).item()
    sigmas = time_shift(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64), shift).float()
    return torch.cat([sigmas, torch.zeros(1)])


def flux_mu(image_seq_len: int, base=(256, 0.5), top=(4096, 1.15)) -> float:
    # FLUX's resolution-dependent shift: mu linear in the target's token count through (256, 0.5) and (4096, 1.15)
    # (diffusers pipeline_flux_kontext.py calculate_shift; BFL sampling.py get_lin_function). Kontext counts the
    # target tokens only, never the reference's.
    m = (top[1] - base[1]) / (top[0] - base[0])
    return image_seq_len * m + base[1] - m * base[0]


def get_flux_schedule(steps: int, image_seq_len: int) -> torch.Tensor:
    # FluxKontextPipeline: sigmas = linspace(1, 1/steps, steps) (float64, then float32), shifted by
    # e^mu / (e^mu + (1/σ - 1)) in float32 (scheduling_flow_match_euler_discrete.py _time_shift_exponential),
    # then a terminal 0. -> [steps+1]
    sigmas = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).float()
    e = math.exp(flux_mu(image_seq_len))
    return torch.cat([e / (e + (1 / sigmas - 1)), torch.zeros(1)])


def ltx2_mu(video_tokens: int, base=(1024, 0.95), top=(4096, 2.05)) -> float:
    # LTX-2's shift: mu linear in the video latent's token count F*h*w through (1024, 0.95) and (4096, 2.05), in
    # diffusers' order of operations (pipeline_ltx2.py:109-119 calculate_shift, called at l.1346 with the packed
    # video's sequence length; ltx-core schedulers.py LTX2Scheduler). The audio tokens do not count.
    m = (top[1] - base[1]) / (top[0] - base[0])
    b = base[1] - m * base[0]
    return video_tokens * m + b


def ltx2_schedule(steps: int, video_tokens: int, terminal: float = 0.1) -> torch.Tensor:
    # LTX2Pipeline: sigmas = linspace(1, 1/steps, steps) (float64, then float32), shifted by e^mu / (e^mu + 1/σ - 1),
    # then stretched so that the last non-zero σ is `terminal` (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting,
    # shift_terminal=0.1) set_timesteps, scheduling_flow_match_euler_discrete.py:262-281, 349-361). Every step in
    # float32 with the scalars rounded to float32 first, as numpy does it there: bit-equal. -> [steps+1], last 0.
    if steps == 1:  # one step: the stretch divides 0 by 0 (diffusers returns NaN); the one step goes from 1 to 0
        return torch.tensor([1.0, 0.0])
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    sigmas = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).float()
    e = f32(math.exp(ltx2_mu(video_tokens)))
    sigmas = e / (e + (1 / sigmas - 1))
    one_minus = 1 - sigmas
    sigmas = 1 - one_minus / (one_minus[-1] / f32(1 - terminal))
    return torch.cat([sigmas, torch.zeros(1)])


def noise_like(shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    # drawn on the CPU so that a seed gives the same image on every device
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Solvers. net(x, sigma[B], **cond, pref=pref) predicts v = ε - x0, so x0 = x - σ·v.


def velocity(fn, x, sigma, cond, pref=None, pack=None, unpack=None):
    """The one calling convention of every backbone: fn(*latents, sigma, pref=, **cond) -> the velocity, packed like x.
    A backbone with several latents (LTX-2: video, audio) is sampled and trained on one packed tensor x; unpack splits
    it into the net's positional latents, pack joins the net's outputs (None: one latent, x itself)."""
    out = fn(*(unpack(x) if unpack else (x,)), sigma, pref=pref, **cond)
    out = out if isinstance(out, tuple) else (out,)
    return pack(out) if pack else out[0]


@torch.no_grad()  # rollouts store only x0 (DiffusionNFT), so sampling never needs a graph
def denoise(
    net,
    x,
    sigmas,
    cond: dict,
    pref=None,
    guidance: float = 1.0,
    uncond: dict | None = None,
    solver: str = "euler",
    progress: bool = False,
) -> torch.Tensor:
    if solver not in ("euler", "dpm2"):
        raise ValueError(f"unknown solver {solver!r}: use 'euler' or 'dpm2'")
    cfg = guidance > 1.0
    if cfg:  # one batched forward for both halves, [uncond; cond] as in pipeline_stable_diffusion_3.py:1067-1086
        if uncond is None:
            raise ValueError("guidance > 1 needs the unconditional inputs (uncond)")
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        pref = None if pref is None else torch.cat([pref, pref])
    dtype, sig = x.dtype, sigmas.tolist()  # state in fp32, coefficients in fp64 (python floats)
    x, x0_prev, s_prev = x.float(), None, None
    for i in tqdm(range(len(sig) - 1), desc=f"sampling ({solver})", disable=not progress):
        s, s_next = sig[i], sig[i + 1]
        x_in = torch.cat([x, x]) if cfg else x
        v = net(x_in.to(dtype), torch.full((x_in.shape[0],), s, device=x.device), **cond, pref=pref).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        if solver == "euler":  # scheduling_flow_match_euler_discrete.py:513-520
            x = x + (s_next - s) * v
            continue
        # DPM-Solver++(2M) in x0-parameterisation with α = 1-σ, λ = log(α/σ) (Lu et al. 2022, alg. 2), as the
        # reference rollouts (DiffusionNFT flow_grpo/diffusers_patch/solver.py dpm_step) and diffusers
        # scheduling_dpmsolver_multistep.py:847-960, 1239-1272 (use_flow_sigmas, flow_prediction) do it.
        x0 = x - s * v
        if s_next == 0:  # last step first order: the first-order update to σ=0 returns x0 itself
            x = x0
            continue
        d = x0
        if x0_prev is not None and s_prev < 1:  # second order; at σ_prev = 1, λ = -∞, r = ∞ and the correction
            lam = lambda t: math.log((1 - t) / t)  # vanishes, so the reference's step 1 is first order too
            h = lam(s_next) - lam(s)
            r = (lam(s) - lam(s_prev)) / h
            d = x0 + (x0 - x0_prev) / (2 * r)
        exp_neg_h = s_next * (1 - s) / ((1 - s_next) * s)  # e^{-h} without logs, so σ = 1 (λ = -∞) is fine
        x = (s_next / s) * x + (1 - s_next) * (1 - exp_neg_h) * d
        x0_prev, s_prev = x0, s
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# SD3.5 text encoders (diffusers pipeline_stable_diffusion_3.py encode_prompt): CLIP-L and OpenCLIP-bigG penultimate
# states, zero-padded to the T5 width, followed by the T5-XXL states on the token axis; pooled = both projected CLIP
# embeddings.


@dataclass
class TextEncoders:
    clip_l: torch.nn.Module  # CLIPTextModelWithProjection
    tok_l: object  # its tokenizer; its model_max_length (77) is the CLIP length for both CLIPs
    clip_g: torch.nn.Module  # CLIPTextModelWithProjection (OpenCLIP bigG)
    tok_g: object
    t5: torch.nn.Module | None  # T5EncoderModel, or None: zeros instead (pipeline_stable_diffusion_3.py:247-256)
    tok_t5: object | None
    context_dim: int  # T5 width = transformer context dim (4096 for SD3.5)
    t5_len: int = 256  # T5 tokens (diffusers max_sequence_length default)

    def to(self, device):  # encoders run once per prompt list; move them off the GPU afterwards
        for m in (self.clip_l, self.clip_g, self.t5):
            if m is not None:
                m.to(device)
        return self


def text_part(path, sub, cls, dtype, device, optional=False):
    """cls (a transformers model or AutoTokenizer) from the subfolder `sub` of a diffusers folder or hub id; None
    when an optional part's folder is missing. Errors name the part and where it was looked for."""
    from transformers import AutoTokenizer

    local = os.path.isdir(path)
    if local and not os.path.isdir(os.path.join(path, sub)):
        if optional:
            return None
        raise FileNotFoundError(f"text encoders: {os.path.join(path, sub)} is missing")
    try:
        if cls is AutoTokenizer:
            return cls.from_pretrained(path, subfolder=sub)
        return cls.from_pretrained(path, subfolder=sub, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        where = "folder" if local else "hub id (is the hub reachable? download the repo and pass its folder)"
        raise RuntimeError(f"text encoders: cannot load {sub} from {where} {path!r}: {e}") from e


def load_text_encoders(path: str, device="cpu", dtype=torch.float32, t5: bool = True) -> TextEncoders:
    # `path`: a diffusers SD3.5 repo folder (text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/) or a hub id
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or path.count("/") != 1):
        raise FileNotFoundError(f"text encoders: {path!r} is neither a diffusers folder nor a hub id (owner/name)")

    part = lambda cls, sub, optional=False: text_part(path, sub, cls, dtype, device, optional)
    t5 = part(T5EncoderModel, "text_encoder_3", optional=True) if t5 else None  # optional, as in diffusers
    return TextEncoders(
        part(CLIPTextModelWithProjection, "text_encoder"),
        part(AutoTokenizer, "tokenizer"),
        part(CLIPTextModelWithProjection, "text_encoder_2"),
        part(AutoTokenizer, "tokenizer_2"),
        t5,
        part(AutoTokenizer, "tokenizer_3") if t5 is not None else None,
        context_dim=t5.config.d_model if t5 is not None else 4096,
    )


def tiny_text_encoders(
    vocab: list[str], seed: int = 0, clip_dims=(32, 32), t5_dim: int = 64, clip_len: int = 8, t5_len: int = 8
) -> TextEncoders:
    # The same three transformers classes with tiny random configs and an offline word-level tokenizer, for the
    # CPU default (train.py --tiny). Fixed seed -> identical weights on every run, without touching the global RNG.
    from transformers import CLIPTextModelWithProjection

    assert sum(clip_dims) <= t5_dim, "the CLIP states are zero-padded to the T5 width"
    ids = _tiny_vocab(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_l, clip_g = (_tiny_clip(CLIPTextModelWithProjection, ids, d, clip_len) for d in clip_dims)
        t5 = _tiny_t5(ids, t5_dim)
    clip_tok = _tiny_tokenizer(ids, "<|startoftext|> $A <|endoftext|>", clip_len)
    t5_tok = _tiny_tokenizer(ids, "$A <|endoftext|>", t5_len)
    return TextEncoders(clip_l, clip_tok, clip_g, clip_tok, t5, t5_tok, context_dim=t5_dim, t5_len=t5_len)


def _tiny_vocab(vocab):
    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]  # eos must not be id 2: modeling_clip.py:551
    return {t: i for i, t in enumerate(specials + sorted(set(w.lower() for w in vocab) - set(specials)))}


def _tiny_sizes(ids, dim):  # a tiny CLIP's or Gemma's vocabulary, widths and special tokens (_tiny_vocab's ids)
    return dict(
        vocab_size=len(ids), hidden_size=dim, intermediate_size=2 * dim, pad_token_id=0, bos_token_id=2, eos_token_id=3
    )


def _tiny_tokenizer(ids, template, max_len):
    # a word-level tokenizer built in code (no files, no hub), wrapped as a transformers fast tokenizer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        special_tokens=[("<|startoftext|>", ids["<|startoftext|>"]), ("<|endoftext|>", ids["<|endoftext|>"])],
    )
    specials = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials)


def _tiny_clip(cls, ids, dim, max_len):  # CLIPTextModel(WithProjection), 2 layers
    from transformers import CLIPTextConfig

    heads = dict(num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_len)
    return cls(CLIPTextConfig(**_tiny_sizes(ids, dim), **heads, projection_dim=dim)).eval()


def _tiny_t5(ids, dim):
    from transformers import T5Config, T5EncoderModel

    sizes = dict(vocab_size=len(ids), d_model=dim, d_kv=dim // 2, d_ff=2 * dim, num_layers=2, num_heads=2)
    return T5EncoderModel(T5Config(**sizes, pad_token_id=0, eos_token_id=3)).eval()


def tokens(tok, prompts, max_len):  # every prompt padded (or cut) to max_len tokens, as the pipelines do
    return tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")


@torch.no_grad()
def encode_prompts(enc: TextEncoders, prompts: list[str], t5_len: int | None = None):
    # pipeline_stable_diffusion_3.py:233-464 (encode_prompt, clip_skip=None); t5_len None = enc.t5_len.
    # -> context [B, clip_len + t5_len, context_dim], pooled [B, D_L + D_G]
    t5_len = t5_len or enc.t5_len
    device, dtype = enc.clip_l.device, enc.clip_l.dtype
    states, pooled = [], []
    for tok, model in ((enc.tok_l, enc.clip_l), (enc.tok_g, enc.clip_g)):
        ids = tokens(tok, prompts, enc.tok_l.model_max_length).input_ids
        out = model(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2].to(dtype))  # penultimate layer, no final LayerNorm
        pooled.append(out.text_embeds)  # projected pooled embedding
    if enc.t5 is None:
        t5 = torch.zeros(len(prompts), t5_len, enc.context_dim, device=device, dtype=dtype)
    else:
        ids = tokens(enc.tok_t5, prompts, t5_len).input_ids
        t5 = enc.t5(ids.to(enc.t5.device))[0].to(device)
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, D_L + D_G] -> [B, 77, 4096]
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# FLUX text encoders (diffusers pipeline_flux_kontext.py): T5-XXL last hidden states (512 tokens, padded, no attention
# mask) as the context, CLIP-L's un-projected pooler output as the pooled vector.


@dataclass
class FluxTextEncoders:
    clip: torch.nn.Module  # CLIPTextModel (pooler_output, not the projected embedding)
    tok_clip: object
    t5: torch.nn.Module  # T5EncoderModel
    tok_t5: object
    t5_len: int = 512  # FLUX.1 dev / Kontext (diffusers max_sequence_length)

    def to(self, device):
        self.clip.to(device), self.t5.to(device)
        return self


def load_flux_text_encoders(path: str, device="cpu", dtype=torch.float32) -> FluxTextEncoders:
    # `path`: a diffusers FLUX repo folder (text_encoder/ = CLIP-L, text_encoder_2/ = T5, tokenizer{,_2}/)
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"text encoders: {path!r} is not a folder (a local FLUX diffusers repo with "
            "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)"
        )

    part = lambda cls, sub: text_part(path, sub, cls, dtype, device)
    return FluxTextEncoders(
        part(CLIPTextModel, "text_encoder"),
        part(AutoTokenizer, "tokenizer"),
        part(T5EncoderModel, "text_encoder_2"),
        part(AutoTokenizer, "tokenizer_2"),
    )


def tiny_flux_text_encoders(
    vocab: list[str], seed: int = 0, clip_dim: int = 32, t5_dim: int = 64, clip_len: int = 8, t5_len: int = 8
) -> FluxTextEncoders:
    # FLUX's two encoder classes, tiny and random (fixed seed), with the offline word-level tokenizers
    from transformers import CLIPTextModel

    ids = _tiny_vocab(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, t5 = _tiny_clip(CLIPTextModel, ids, clip_dim, clip_len), _tiny_t5(ids, t5_dim)
    return FluxTextEncoders(
        clip,
        _tiny_tokenizer(ids, "<|startoftext|> $A <|endoftext|>", clip_len),
        t5,
        _tiny_tokenizer(ids, "$A <|endoftext|>", t5_len),
        t5_len=t5_len,
    )


@torch.no_grad()
def encode_flux_prompts(enc: FluxTextEncoders, prompts: list[str]):
    # pipeline_flux_kontext.py _get_t5_prompt_embeds / _get_clip_prompt_embeds -> context [B, t5_len, D_t5],
    # pooled [B, D_clip]
    ids = tokens(enc.tok_clip, prompts, enc.tok_clip.model_max_length).input_ids
    pooled = enc.clip(ids.to(enc.clip.device), output_hidden_states=False).pooler_output
    ids = tokens(enc.tok_t5, prompts, enc.t5_len).input_ids
    context = enc.t5(ids.to(enc.t5.device), output_hidden_states=False)[0]
    return context.to(pooled.device), pooled


# ----------------------------------------------------------------------------------------------------------------
# LTX-2 text encoder (diffusers pipeline_ltx2.py): Gemma-3 over the prompt left-padded to 1024 tokens, all its hidden
# states stacked ([B, L, C, layers + 1]), then model.LTX2TextConnectors (per-layer norm, aggregate projection, the two
# connectors) -> the DiT's context and context_audio (pipeline_ltx2.py:303-372 _get_gemma_prompt_embeds).


@dataclass
class LTX2TextEncoder:
    gemma: torch.nn.Module  # Gemma3 (text part): its hidden_states are all the encoder gives
    tok: object  # its tokenizer, padding on the left (the connectors expect the tokens last)
    connectors: torch.nn.Module  # model.LTX2TextConnectors
    max_len: int = 1024  # tokens per prompt (diffusers max_sequence_length)
    device: object = None  # where it encodes (None: where its parts are)

    def to(self, device):  # Gemma, then the connectors, visit `device` in turn: the GPU holds the larger, not the sum
        self.device = device
        return self

    def __call__(self, prompts):
        return encode_ltx2_prompts(self, prompts)


def tiny_ltx2_text_encoder(
    vocab: list[str], seed: int = 0, dim: int = 64, layers: int = 2, max_len: int = 8, registers: int = 8
) -> LTX2TextEncoder:
    # transformers' Gemma3 text model and our connectors, tiny and random (fixed seed), with the offline word-level
    # tokenizer; the connectors' width is Gemma's (caption_channels), their registers tile the max_len tokens
    from transformers import Gemma3TextConfig, Gemma3TextModel

    import model

    ids = _tiny_vocab(vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = dict(num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=dim // 2)
        window = dict(max_position_embeddings=max_len, sliding_window=max_len)
        gemma = Gemma3TextModel(Gemma3TextConfig(**_tiny_sizes(ids, dim), **heads, **window)).eval()
        video = dict(heads=4, head_dim=dim // 4, depth=1, registers=registers)  # the audio connector: the same
        cfg = model.LTX2ConnectorConfig(dim, layers + 1, **video, **{f"audio_{k}": v for k, v in video.items()})
        connectors = model.LTX2TextConnectors(cfg).eval()
    tok = _tiny_tokenizer(ids, "<|startoftext|> $A", max_len)
    tok.padding_side = "left"
    return LTX2TextEncoder(gemma, tok, connectors, max_len)


def load_ltx2_text_encoder(
    path: str, device="cpu", dtype=torch.float32, connectors: str | None = None, max_len: int = 1024
) -> LTX2TextEncoder:
    """path: a diffusers LTX-2 folder (text_encoder/ = Gemma3ForConditionalGeneration, tokenizer/, connectors/) or a
    Gemma-3 folder (config.json and the tokenizer files side by side). connectors: where the connectors are when path
    has no connectors/ (Lightricks' combined file, or a diffusers folder; model.load_ltx2_connectors reads both).
    Only Gemma's language model runs: with text alone its hidden states are those of the whole multimodal model, so
    the vision tower is dropped after loading."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, Gemma3ForConditionalGeneration

    import model

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"LTX-2 text encoder: {path!r} is not a folder (a diffusers LTX-2 folder with "
            "text_encoder/, tokenizer/, connectors/, or a Gemma-3 folder)"
        )
    sub = lambda name: os.path.join(path, name) if os.path.isdir(os.path.join(path, name)) else path
    gemma_dir, tok_dir = sub("text_encoder"), sub("tokenizer")
    if not os.path.isfile(os.path.join(gemma_dir, "config.json")):
        raise FileNotFoundError(
            f"LTX-2 text encoder: no Gemma-3 in {path} (neither text_encoder/config.json nor config.json)"
        )
    connectors = os.path.join(path, "connectors") if os.path.isdir(os.path.join(path, "connectors")) else connectors
    if connectors is None:
        raise FileNotFoundError(
            f"LTX-2 text encoder: {path} has no connectors/; they come with the LTX-2 weights "
            "(a diffusers folder's connectors/ or Lightricks' combined file)"
        )
    try:
        kind = AutoConfig.from_pretrained(gemma_dir).model_type
        if kind == "gemma3":  # the release's text encoder: take its language model
            gemma = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir, dtype=dtype).model.language_model
        elif kind == "gemma3_text":
            gemma = AutoModel.from_pretrained(gemma_dir, dtype=dtype)
        else:
            raise ValueError(f"model type {kind!r}, not Gemma-3 (gemma3 or gemma3_text)")
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"LTX-2 text encoder: cannot load Gemma-3 from {gemma_dir}: {e}") from e
    if tok.pad_token is None:  # as LTX2Pipeline._get_gemma_prompt_embeds
        tok.pad_token = tok.eos_token
    conn = model.load_ltx2_connectors(connectors, dtype=dtype, device=device)
    need = (gemma.config.hidden_size, gemma.config.num_hidden_layers + 1)
    if (conn.cfg.caption_channels, conn.cfg.text_layers) != need:
        raise ValueError(
            f"LTX-2 text encoder: the connectors take {conn.cfg.text_layers} hidden states of width "
            f"{conn.cfg.caption_channels}, the Gemma-3 in {gemma_dir} gives {need[1]} of width {need[0]}"
        )
    return LTX2TextEncoder(gemma.to(device).eval(), tok, conn, max_len)


@torch.no_grad()
def encode_ltx2_prompts(enc: LTX2TextEncoder, prompts: list[str]) -> dict:
    # -> the DiT's keyword inputs: context, context_audio [B, max_len, C]. No context_mask: the connectors' registers
    # fill the padding, so their mask is all ones, and the DiT's text attention runs unmasked (a mask, even of ones,
    # would keep SDPA off its FlashAttention kernel)
    enc.tok.padding_side = "left"
    t = tokens(enc.tok, [p.strip() for p in prompts], enc.max_len)
    with on_device(enc.gemma, enc.device or "cpu"):
        dev = next(enc.gemma.parameters()).device
        mask = t.attention_mask.to(dev)
        out = enc.gemma(input_ids=t.input_ids.to(dev), attention_mask=mask, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, -1)
    with on_device(enc.connectors, enc.device or "cpu"):
        q = next(enc.connectors.parameters())
        context, context_audio, _ = enc.connectors(hidden.to(q.device, q.dtype), mask.to(q.device))
    return dict(context=context, context_audio=context_audio)


def ltx2_packing(video_shape, audio_shape):
    """The loop stores one x0 per sample: LTX-2's video latent [C, F, h, w] and audio latent [Ca, A, mel] flattened
    and concatenated, [n_video + n_audio]. -> (pack: (v_video, v_audio) -> x [B, n], unpack: x -> (video, audio))."""
    n = math.prod(video_shape)
    pack = lambda out: torch.cat([out[0].flatten(1), out[1].flatten(1)], 1)
    unpack = lambda x: (x[:, :n].unflatten(1, video_shape), x[:, n:].unflatten(1, audio_shape))
    return pack, unpack


# ----------------------------------------------------------------------------------------------------------------
# Images


def sd3_cond(enc, prompts):  # SD3.5's keyword inputs of the net for these prompts
    return dict(zip(("context", "pooled"), encode_prompts(enc, prompts)))


def prompt_conditions(encode, prompts, guidance=1.0, negative_prompt=""):
    # encode: prompts -> cond dict. -> (cond, uncond or None) as denoise takes them; the uncond half is only
    # encoded when CFG is on
    return encode(prompts), encode([negative_prompt] * len(prompts)) if guidance > 1.0 else None


def decode(vae, x0):
    # x0 -> images [B,3,H,W] in [0,1]. vae None: a pixel-space net (the tiny default) whose x0 lives in [-1,1].
    if vae is None:
        return ((x0.float() + 1) / 2).clamp(0, 1)
    q = next(vae.parameters())
    return vae.decode(x0.to(q.device, q.dtype)).float().clamp(0, 1)


@torch.no_grad()
def to_pil(img):  # [3,H,W] in [0,1] -> PIL image
    from PIL import Image

    return Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().cpu().numpy())


def pref_label(w):
    return "w=(" + ", ".join(f"{v:.2f}" for v in w) + ")"


def image_grid(rows, col_labels, row_labels=None, tile=160):
    """One picture of rows x columns of images [3,H,W] in [0,1] (rows: lists of equal length), a label above each
    column and, if given, left of each row. Tiles smaller than `tile` px are enlarged by an integer factor,
    nearest-neighbour, so that a 32 px image stays sharp and the labels fit. train.py's slider.png (rows = eval
    prompts, columns = ω) and sample.py's strip (one row) are both this picture."""
    from PIL import Image, ImageDraw, ImageFont

    first = to_pil(rows[0][0])
    scale = max(1, math.ceil(tile / first.width))
    w, h = first.width * scale, first.height * scale
    band = max(20, min(w, h) // 8)
    font = ImageFont.load_default(size=band * 0.6)
    left = 0 if not row_labels else max(int(font.getlength(t)) for t in row_labels) + 12
    grid = Image.new("RGB", (left + w * len(rows[0]), band + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + w / 2, band / 2), label, fill="black", font=font, anchor="mm")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(to_pil(img).resize((w, h), Image.NEAREST), (left + j * w, band + i * h))
        if row_labels:
            draw.text((6, band + i * h + h / 2), row_labels[i], fill="black", font=font, anchor="lm")
    return grid


def write_file(path, write):
    """write(tmp) writes the file, which then replaces `path` in one rename: a failure (a full disk, a killed process)
    never leaves a truncated file under the name nor destroys the one already there; one line names the file.
    Temporaries that killed writes of this name left behind go first."""
    import model

    model.sweep_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    try:
        model.atomic_write(path, write)
    except OSError as e:
        raise UsageError(
            f"{path}: could not write it ({e.strerror or e}); any earlier file of that name is intact"
        ) from None


def image_format(path):
    # PIL's format for the file's extension (the temporary's name has none), or None
    from PIL import Image

    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def save_image(img, path):
    write_file(path, lambda tmp: img.save(tmp, format=image_format(path)))


def save_video(frames, path, fps=24.0):
    """frames: a video [T,3,H,W] in [0,1] (a tensor, or a list of [3,H,W] tensors or PIL images) -> an animated
    image, WebP or GIF by the extension of path, looping, and an H.264 .mp4 beside it where PyAV is installed.
    -> the paths written."""
    from PIL import Image

    images = [f if isinstance(f, Image.Image) else to_pil(f) for f in frames]
    write_file(path, lambda tmp: save_animation(images, tmp, fps, image_format(path)))
    try:
        import av
    except ImportError:
        print("(PyAV is not installed: no .mp4 beside it; pip install av for one)")
        return [path]
    mp4 = os.path.splitext(path)[0] + ".mp4"

    def encode(tmp):
        from fractions import Fraction

        with av.open(tmp, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            w, h = images[0].size
            stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"  # 4:2:0 needs even sides
            for im in images:
                canvas = Image.new("RGB", (stream.width, stream.height))
                canvas.paste(im)
                out.mux(stream.encode(av.VideoFrame.from_image(canvas)))
            out.mux(stream.encode())  # flush

    try:
        write_file(mp4, encode)
    except Exception as e:  # the animated image is written; an encoder this FFmpeg lacks only costs the .mp4
        print(f"(no .mp4: {e})")
        return [path]
    return [path, mp4]


def save_animation(images, fp, fps, format):
    # PIL images -> a looping animated WebP or GIF (format "WEBP" / "GIF") into a path or a file object
    extra = dict(quality=90) if format.upper() == "WEBP" else {}
    images[0].save(
        fp, format=format, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra
    )


def save_wav(wav, path, rate):
    # a waveform [channels, samples] in [-1, 1] -> a 16-bit PCM WAV (standard library), samples interleaved
    import wave

    pcm = (wav.float().clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().cpu().numpy()

    def write(tmp):
        with wave.open(tmp, "wb") as f:
            f.setnchannels(wav.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(rate))
            f.writeframes(pcm.astype("<i2").tobytes())

    write_file(path, write)


# ----------------------------------------------------------------------------------------------------------------
# CLI


class UsageError(Exception):  # bad input from the command line: one clear line on stderr, exit code 2
    pass


def parse_pref(text: str) -> list[float]:
    # "0.3" -> (0.3, 0.7) for two objectives; "0.2,0.3,0.5" -> the full vector. ω must lie on the simplex: the
    # model was trained there only (reference eval renormalises custom weights; we refuse instead of guessing).
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--pref {text!r}: expected a number or a comma-separated vector like 0.2,0.3,0.5") from None
    if len(w) == 1:
        w = [w[0], 1 - w[0]]
    if any(v < 0 or not math.isfinite(v) for v in w) or abs(sum(w) - 1) > 1e-3:
        raise UsageError(f"--pref {text!r}: ω = {w} is not on the simplex (entries >= 0 summing to 1 within 1e-3)")
    return w


# ----------------------------------------------------------------------------------------------------------------
# Loading: one loader per backbone builds net + VAE + text encoders + decode from a spec (a plain dict, saved with
# every trained adapter, so a run folder says how to rebuild what it trained). train.py's full-size setup and this
# CLI both come through here.


@dataclass
class Pipeline:
    net: torch.nn.Module  # the transformer (+ the adapter, if one was given)
    vae: torch.nn.Module | None = None  # None: a pixel-space net (the tiny defaults) whose x0 lives in [-1, 1]
    enc: object = None  # the text encoders
    encode: callable = None  # prompts -> cond dict of tensors [B, ...] (the net's keyword inputs)
    latent: callable = None  # (height, width) px -> one x0's shape; None: SD3's (C, H/8, W/8)
    schedule: callable = None  # (steps, shift, x0 shape) -> sigmas; None: get_schedule(steps, shift)
    to_latent: callable = None  # images [B,3,H,W] in [0,1] -> latents (Kontext's reference image)
    from_latent: callable = None  # x0 -> images in [0,1]; None: the VAE's decode (pixels without one)
    guidance_input: bool = False  # FLUX: the guidance scale is an input of the net, not CFG
    packing: callable = None  # a net with several latents (LTX-2): same arguments as `latent` ->
    #                                          (pack, unpack) of sample.velocity; None: x0 is the net's one latent
    net_kwargs: dict = None  # fixed keyword inputs of the net that are no batched tensors (LTX-2's fps)
    audio: callable = None  # LTX-2 with its audio decoders: x0 -> (waveform [B, channels, samples] in
    #                                          [-1, 1], samples per second)

    def conditions(self, prompts, guidance=1.0, negative_prompt=""):
        with self.encoding():
            return prompt_conditions(
                self.encode, prompts, guidance if not self.guidance_input else 1.0, negative_prompt
            )

    def encoding(self):
        # the text encoders on the net's device while the block encodes (they live on the CPU beside a GPU net)
        return on_device(self.enc, next(self.net.parameters()).device)

    def decode(self, x0):
        return self.from_latent(x0) if self.from_latent else decode(self.vae, x0)

    def x0_shape(self, height, width, frames=None):
        if self.latent:
            return self.latent(height, width, **({} if frames is None else dict(frames=frames)))
        f = 8 if self.vae is not None else 1  # SD3's VAE, or a pixel-space net
        return (self.net.cfg.in_channels, height // f, width // f)

    @torch.no_grad()
    def generate(
        self,
        cond,
        uncond,
        pref,
        steps,
        seed,
        height,
        width,
        guidance=1.0,
        solver="euler",
        shift=3.0,
        progress=False,
        frames=None,
        decode=True,
    ):
        # -> images [B,3,H,W] in [0,1] (a video backbone: what its decode gives; decode=False: x0 itself). The same
        # seed always starts from the same noise, so a sweep over ω compares like with like.
        p = next(self.net.parameters())
        to_net = lambda d: None if d is None else {k: v.to(p.device, p.dtype) for k, v in d.items()}
        cond, uncond = to_net(cond), to_net(uncond)
        batch = next(iter(cond.values())).shape[0]
        if self.guidance_input:  # guidance-distilled: one forward per step, the scale goes in as an input
            cond["guidance"], guidance = torch.full((batch,), float(guidance), device=p.device), 1.0
        shape = self.x0_shape(height, width, frames)
        clip = {} if frames is None else dict(frames=frames)  # a video backbone's frame count
        x = noise_like((batch, *shape), seed, p.device)  # the state, ω and σ in fp32; the net casts its inputs
        if pref is not None:
            pref = torch.as_tensor(pref, dtype=torch.float32, device=p.device).expand(batch, -1)
        sigmas = self.schedule(steps, shift, shape) if self.schedule else get_schedule(steps, shift)
        pack, unpack = self.packing(height, width, **clip) if self.packing else (None, None)
        step = lambda x, s, pref=None, **c: velocity(
            self.net, x, s, {**c, **(self.net_kwargs or {})}, pref, pack, unpack
        )
        x0 = denoise(step, x, sigmas, cond, pref, guidance, uncond, solver, progress)
        return self.decode(x0) if decode else x0

    def with_flags(self, args, cond, uncond, pref, size=None, seed=None, **kw):
        """generate with sample.py's settings (args: steps, seed, guidance, solver, shift, frames); size: (height,
        width), default args.size square"""
        height, width = size or (args.size, args.size)
        seed = args.seed if seed is None else seed
        a = (args.steps, seed, height, width, args.guidance, args.solver, args.shift)
        return self.generate(cond, uncond, pref, *a, frames=args.frames, **kw)


def load_net(weights, lora, dtype, device, lazy=False):
    # lazy (a spec's "lazy": train.py --fsdp): nothing read yet, each rank reads its shard later (model.materialise)
    import model

    pref_dim = 0
    if lora:  # the adapter records the config it was trained with (model.save_adapters), incl. the objective count
        pref_dim = model.read_adapter_meta(lora)["config"].get("pref_dim", 0)
    net = model.load_transformer(weights, pref_dim=pref_dim, dtype=dtype, device=device, lazy=lazy)
    if lora:
        model.load_adapters(net, lora)
    return net.eval()


def load_sd35(spec, dtype=torch.float32, device="cpu", lora=None):
    """spec: {"weights": diffusers repo folder or single file, "text_encoders": folder or hub id (default: weights
    when it is a folder), "t5": bool} or, for the tiny default, {"weights": the cached base file,
    "tiny_text_encoders": tiny_text_encoders' keyword arguments}. A 3-channel net without a VAE is pixel-space."""
    import model

    weights = spec["weights"]
    net = load_net(weights, lora, dtype, device, spec.get("lazy", False))
    vae = None
    if os.path.isdir(weights) and os.path.exists(os.path.join(weights, "vae")):
        vae = model.load_vae(os.path.join(weights, "vae"), dtype=dtype, device=device)  # constants from config.json
    elif net.cfg.in_channels != 3:  # a Stability single file bundles the VAE (first_stage_model.*), no constants
        vae = model.load_vae(weights, dtype=dtype, device=device, **model.VAE_SD3)
    what = "a diffusers SD3.5 folder or hub id"
    enc = text_encoders(spec, tiny_text_encoders, load_text_encoders, device, dtype, what, t5=spec.get("t5", True))
    return Pipeline(net, vae, enc, (lambda prompts: sd3_cond(enc, prompts)) if enc else no_text_encoder)


def text_encoders(spec, tiny, load, device, dtype, what, **kw):
    """The spec's tiny encoders (rebuilt from their vocabulary and seed), or loaded from a folder: on the CPU, in the
    net's dtype when the net is on a GPU (fp32 when it runs on the CPU). They visit the GPU only to encode
    (Pipeline.encoding), so they never sit there beside the transformer while it samples or trains. None with the
    spec's "no_text_encoder" (its prompts were encoded before, or elsewhere)."""
    if spec.get("no_text_encoder"):
        return None
    if "tiny_text_encoders" in spec:
        return tiny(**spec["tiny_text_encoders"])
    te = spec.get("text_encoders") or (spec["weights"] if os.path.isdir(spec["weights"]) else None)
    if te is None:
        raise UsageError(f"--weights is a single file: pass --text-encoders ({what})")
    return load(te, "cpu", dtype if torch.device(device).type != "cpu" else torch.float32, **kw)


@contextmanager
def on_device(enc, device):
    # text encoders (anything with .to) on `device` for the block, back on the CPU after, their GPU memory freed
    if enc is None or torch.device(device).type == "cpu":
        yield enc
        return
    enc.to(device)
    try:
        yield enc
    finally:
        enc.to("cpu")
        torch.cuda.empty_cache()


def load_flux(spec, dtype=torch.float32, device="cpu", lora=None):
    """FLUX.1 Kontext [dev] (or FLUX.1 [dev]). spec: {"weights": diffusers repo folder (transformer/, vae/,
    text_encoder/ = CLIP-L, text_encoder_2/ = T5) or BFL's single file, "vae": BFL's ae.safetensors (a single file
    carries no latent constants: FLUX's are used), "text_encoders": a FLUX diffusers folder (default: weights)} or,
    for the tiny default, {"weights": the cached base, "tiny_text_encoders": {...}, "pixels": 2}: a pixel-space
    net whose x0 is the image in [-1, 1] space-to-depth'ed 2x2 ([12, H/2, W/2])."""
    import model

    weights = spec["weights"]
    net = load_net(weights, lora, dtype, device, spec.get("lazy", False))
    C = net.cfg.in_channels // 4  # unpacked latent channels (16 for the released model)
    if spec.get("pixels"):
        f = spec["pixels"]
        to_latent = lambda img: space_to_depth(img.to(next(net.parameters()).dtype), f)
        from_latent = lambda x0: depth_to_space(x0, f)
        pipe = dict(vae=None, latent=lambda h, w: (C, h // f, w // f), to_latent=to_latent, from_latent=from_latent)
    else:
        folder_vae = os.path.join(weights, "vae") if os.path.isdir(weights) else None
        if spec.get("vae"):
            vae = model.load_vae(spec["vae"], dtype=dtype, device=device, **model.VAE_FLUX)
        elif folder_vae and os.path.isdir(folder_vae):
            vae = model.load_vae(folder_vae, dtype=dtype, device=device)
        else:
            raise UsageError("FLUX needs its VAE: --weights a diffusers folder with vae/, or --vae ae.safetensors")
        # the reference image: VAE posterior mean, shifted and scaled (pipeline_flux_kontext.py sample_mode="argmax")
        to_latent = lambda img: vae.encode(img.to(next(vae.parameters()).dtype))
        pipe = dict(
            vae=vae,
            latent=lambda h, w: (C, h // 8, w // 8),
            to_latent=to_latent,
            schedule=lambda steps, shift, shape: get_flux_schedule(steps, (shape[1] // 2) * (shape[2] // 2)),
        )
    enc = text_encoders(
        spec, tiny_flux_text_encoders, load_flux_text_encoders, device, dtype, "a FLUX diffusers folder"
    )
    encode = lambda prompts: dict(zip(("context", "pooled"), encode_flux_prompts(enc, prompts)))
    encode = encode if enc else no_text_encoder
    return Pipeline(net, enc=enc, encode=encode, guidance_input=True, **pipe)


def space_to_depth(img, f=2):  # images [B,3,H,W] in [0,1] -> the tiny FLUX's x0 [B,3f^2,H/f,W/f] in [-1,1]
    return F.pixel_unshuffle(img * 2 - 1, f)


def depth_to_space(x0, f=2):  # the inverse, clamped to [0,1]
    return ((F.pixel_shuffle(x0.float(), f) + 1) / 2).clamp(0, 1)


def frames_to_latent(video, f=4):  # video [B,T,3,H,W] in [0,1] -> the tiny LTX-2's x0 [B,3f^2,T,H/f,W/f] in [-1,1]
    return space_to_depth(video, f).transpose(1, 2)  # pixel_unshuffle takes any leading dims: per frame


def latent_to_frames(z, f=4):  # the inverse, clamped to [0,1]: [B,3f^2,T,h,w] -> [B,T,3,hf,wf]
    return depth_to_space(z.transpose(1, 2), f)


def ltx2_text_encoder(spec, device, dtype):
    # Gemma-3 + the connectors of a full-size spec: from its text_encoders folder, or its weights folder
    what = "a diffusers LTX-2 folder, or a Gemma-3 folder"
    return text_encoders(spec, None, load_ltx2_text_encoder, device, dtype, what, connectors=spec["weights"])


def load_ltx2(spec, dtype=torch.float32, device="cpu", lora=None):
    """LTX-2 (audio + video). spec: {"weights": a diffusers folder (transformer/, vae/, connectors/, text_encoder/,
    tokenizer/, audio_vae/, vocoder/) or Lightricks' combined file, "text_encoders": a diffusers LTX-2 folder or a
    Gemma-3 folder (default: weights when it is a folder; needed with the combined file), "audio": also load the audio
    VAE and vocoder (Pipeline.audio), "fps": the frame rate, an input of the net (default 24), "no_text_encoder": skip
    Gemma (its prompts were encoded before; Pipeline.encode then refuses)} or, for the tiny
    default, {"weights": the cached base, "tiny_text_encoder": {...}, "pixels": 4}: a pixel-space net whose video
    latent is the frames space-to-depth'ed (frames_to_latent) and whose audio latent has one frame per video frame.
    x0 is the video and audio latents packed into one vector (ltx2_packing); latent and packing take (height, width,
    frames); decode gives videos [B, T, 3, H, W] in [0, 1]."""
    import model

    weights, fps, tiny = spec["weights"], float(spec.get("fps", 24.0)), bool(spec.get("pixels"))
    check_ltx2_spec(spec, tiny)
    net = load_net(weights, lora, dtype, device, spec.get("lazy", False))
    c = net.cfg
    audio_latent = lambda A: (c.audio_channels, A, c.audio_in_channels // c.audio_channels)  # [8, A, 16]
    if tiny:
        f = spec["pixels"]
        shapes = lambda h, w, frames: ((c.in_channels, frames, h // f, w // f), audio_latent(frames))
        to_video = lambda z: latent_to_frames(z, f)
        vae, enc = None, tiny_ltx2_text_encoder(**spec["tiny_text_encoder"])
    else:
        ft, fs, _ = c.vae_scale_factors  # 8, 32 (the VAE's compression: frames 8k+1 -> k+1 latent frames)

        def shapes(h, w, frames):
            if (frames - 1) % ft or h % fs or w % fs:
                raise ValueError(
                    f"LTX-2: {frames} frames of {h}x{w} px; the VAE needs {ft}k+1 frames and sides that "
                    f"are multiples of {fs}"
                )
            # audio latent frames for the clip's duration, 25 per second: 16 kHz, hop 160, 4 mel frames per latent
            # frame, in diffusers' order of operations (pipeline_ltx2.py:1306-1310)
            A = round(frames / fps * (c.audio_sampling_rate / c.audio_hop_length / float(c.audio_scale_factor)))
            return (c.in_channels, (frames - 1) // ft + 1, h // fs, w // fs), audio_latent(A)

        vae = model.load_vae(weights, dtype=dtype, device=device)  # a folder's vae/ or the combined file's vae.*
        to_video = lambda z: vae.decode(z.to(next(vae.parameters()).dtype)).float().transpose(1, 2)
        enc = None if spec.get("no_text_encoder") else ltx2_text_encoder(spec, device, dtype)
    clips = ClipLayouts(shapes)
    unpack = lambda x0: ltx2_packing(*clips.of(x0.shape[1]))[1](x0)
    audio = None
    if spec.get("audio"):  # mel spectrogram [B, 2, 4A-3, 64] -> waveform [B, 2, 240 (4A-3)] at 24 kHz
        audio_vae, vocoder = model.load_ltx2_audio(weights, dtype=dtype, device=device)
        audio = lambda x0: (vocoder(audio_vae.decode(unpack(x0)[1].to(dtype))).float(), vocoder.cfg.sample_rate)
    video_tokens = lambda shape: math.prod(clips.of(shape[0])[0][1:])  # F*h*w tokens set the schedule's shift
    return Pipeline(
        net,
        vae,
        enc,
        enc or no_text_encoder,
        latent=lambda h, w, frames=None: (sum(math.prod(p) for p in clips(h, w, frames)),),
        schedule=None if tiny else lambda steps, shift, shape: ltx2_schedule(steps, video_tokens(shape)),
        from_latent=lambda x0: to_video(unpack(x0)[0]),
        packing=lambda h, w, frames=None: ltx2_packing(*clips(h, w, frames)),
        net_kwargs=dict(fps=fps),
        audio=audio,
    )


def check_ltx2_spec(spec, tiny):
    # before the 19B transformer loads: the video VAE must be in the weights, Gemma reachable
    import model

    weights = spec["weights"]
    if spec.get("audio") and tiny:
        raise ValueError("the tiny LTX-2 has no audio VAE or vocoder (its audio latent is a toy signal)")
    if tiny:
        return
    if os.path.isdir(weights):
        has_vae = os.path.isdir(os.path.join(weights, "vae"))
    else:
        has_vae = bool(model.read_safetensors(weights, keep=lambda k: k == "vae." + model.LTX2_VAE_SIGNATURE)[0])
    if not has_vae:
        raise UsageError(
            f"--weights {weights}: no LTX-2 video VAE there (a diffusers folder with vae/, or Lightricks' "
            "combined file with vae.*)"
        )
    if not spec.get("no_text_encoder") and not spec.get("text_encoders") and not os.path.isdir(weights):
        raise UsageError(
            "--weights is a single file: pass --text-encoders (a diffusers LTX-2 folder, or a Gemma-3 folder)"
        )


def no_text_encoder(prompts):
    raise ValueError("this pipeline was loaded without its text encoders (no_text_encoder)")


class ClipLayouts:
    """A video backbone's x0 packs its video and audio latents into one vector: the loop and decode see only its
    length n. shapes(h, w, frames) -> the latents' shapes; the layouts made so far are kept by n, so that decode and the
    schedule find them back from an x0 (one clip size per pipeline in practice)."""

    def __init__(self, shapes):
        self.shapes, self.known = shapes, {}

    def __call__(self, h, w, frames=None):
        if frames is None:
            raise ValueError("LTX-2 makes videos: give the frame count (frames=)")
        parts = self.shapes(h, w, frames)
        n = sum(math.prod(p) for p in parts)
        if self.known.setdefault(n, parts) != parts:
            raise ValueError(
                f"LTX-2: clips of {self.known[n]} and {parts} both pack to {n} numbers; use one pipeline per clip size"
            )
        return parts

    def of(self, n):
        if n not in self.known:
            raise ValueError(
                f"LTX-2: no clip size of this pipeline packs to {n} numbers (x0_shape(height, width, "
                "frames) makes the layout)"
            )
        return self.known[n]


# Kontext was trained at these ~1 MP (width, height) sizes; a reference image goes to the one nearest its aspect
# ratio (diffusers pipeline_flux_kontext.py:82-100, 937-943; BFL util.py PREFERED_KONTEXT_RESOLUTIONS)
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
]  # fmt: skip


def kontext_resolution(width, height):
    return min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)[1:]


MAX_PIXELS = 64 * 2**20  # an image to edit of more pixels is refused (a decompression bomb decodes to gigabytes)


def open_image(src, what):
    """A path or file object -> a PIL image in RGB (any mode converted), decoded; anything else (not an image, a
    truncated or hostile file, more than MAX_PIXELS pixels) is a UsageError that names `what`."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(src)
            if img.width * img.height > MAX_PIXELS:
                raise UsageError(f"{what}: {img.width}x{img.height} pixels, more than the {MAX_PIXELS} accepted")
            img.load()
    except UsageError:
        raise
    except Image.DecompressionBombError:
        raise UsageError(f"{what}: too many pixels (a decompression bomb?)") from None
    except Exception:  # PIL raises many kinds on a broken file (OSError, SyntaxError, ValueError, ...): its text is
        raise UsageError(f"{what}: not an image this program can read (or truncated)") from None  # not for users
    return img.convert("RGB")


def load_image(src, size=None, what=None):
    """-> image [1, 3, H, W] in [0, 1]. size: (width, height) to resize to (bicubic, as diffusers' VaeImageProcessor),
    or None. Errors name `what` (default: --image and the file); any mode (grayscale, RGBA, palette) becomes RGB."""
    from PIL import Image

    img = src if isinstance(src, Image.Image) else open_image(src, what or f"--image {src}")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.BICUBIC)
    import numpy as np

    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


# sample.py's row per backbone, keyed as model.BACKBONES (tests/test_contract.py checks it): its loader
# (spec, dtype, device, lora) -> Pipeline, the flags only that loader reads, and the sampling defaults where they differ
# from the images' (LTX2Pipeline: 30 steps, 121 frames at 24 fps; 512 px, its stage-1 height)
LOADERS = {
    "sd35": dict(load=load_sd35, flags={"--no-t5": "SD3.5's T5 encoder"}),
    "flux-kontext": dict(load=load_flux, flags={"--vae": "FLUX's single-file VAE"}),
    # text: train.py loads, uses and frees Gemma-3 alone before the transformer (together they do not fit 80 GB)
    "ltx2": dict(
        load=load_ltx2,
        text=lambda spec, device, dtype: ltx2_text_encoder(spec, device, dtype),  # (late-bound: tests spy on it)
        defaults=dict(steps=30, size=512, frames=121, fps=24.0, out="out.webp"),
    ),
}


# sample.py's flags: (flag, type or action or choices, help); the run's settings fill the ones left unset (run_settings)
FLAGS = [
    ("--run", str, "a train.py run folder: its adapter, base model, text encoders and sampling settings (steps, "
     "solver, shift, size; flags given here override them)"),
    ("--backbone", sorted(LOADERS), "model family (with --weights; default sd35)"),
    ("--weights", str, "diffusers repo folder (transformer/, vae/, text encoders) or an original single .safetensors"),
    ("--text-encoders", str, "diffusers folder or hub id with text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/; ltx2: a "
     "diffusers LTX-2 folder or a Gemma-3 folder (default: --weights when it is a folder)"),
    ("--no-t5", "store_true", "skip T5-XXL (zeros instead, as diffusers does)"),
    ("--lora", str, "adapter .safetensors (LoRA + preference modules) written by train.py"),
    ("--prompt", str, "text prompt (not with --serve: the page asks for it)"),
    ("--negative-prompt", str, "unconditional prompt for CFG (with --guidance > 1; default empty)"),
    ("--pref", str, "ω: w1 for two objectives (ω = (w1, 1-w1)) or a full vector like 0.2,0.3,0.5"),
    ("--sweep", int, "N >= 2: one strip of N images, ω = (1-i/(N-1), i/(N-1))"),
    ("--steps", int, "ODE steps (default 28; a run's sample_steps)"),
    ("--solver", ["euler", "dpm2"], "ODE solver (default euler; a run's solver)"),
    ("--shift", float, "schedule time shift (default 3.0 for SD3.5; a run's shift)"),
    ("--guidance", float, "SD3.5: classifier-free guidance scale (default 1 = off); FLUX: the distilled guidance "
     "input (default 2.5, one forward per step)"),
    ("--image", str, "editing backbones: the source image to edit; resized to the nearest Kontext resolution (a tiny "
     "run: to its size)"),
    ("--vae", str, "FLUX with a single-file --weights: BFL's ae.safetensors"),
    ("--seed", int, "noise seed, in [0, 2^31) (default 0; the same seed gives the same noise on every device)"),
    ("--size", int, "image side in pixels (the backbone's multiple; default 1024, LTX-2 512; a run's size)"),
    ("--frames", int, "video backbones: frames per clip (8k+1; default 121; a run's frames)"),
    ("--fps", float, "video backbones: frames per second, an input of the net and the playback rate (default 24)"),
    ("--audio", "store_true", "ltx2: decode the sound too (audio VAE + vocoder) and write a WAV beside the video"),
    ("--dtype", ["fp32", "bf16", "fp16"], "the base model's dtype (default: bf16 on a GPU, fp32 on a CPU; adapters "
     "stay fp32, cast at use; fp16 clips FLUX's activations as diffusers does)"),
    ("--compile", "store_true", "torch.compile each repeated block (regional; the first image pays the compile time)"),
    ("--device", str, "torch device (default: cuda where available)"),
    ("--out", str, "output image (default out.png); a video: an animated .webp or .gif (default out.webp), plus an "
     ".mp4 beside it where PyAV is installed"),
    ("--kernels", ["triton", "torch"], "fused Triton kernels or the PyTorch references (default: Triton on a GPU)"),
    ("--serve", "store_true", "a local page with the slider: drag ω, watch the image move"),
    ("--export-diffusers", str, "write the adapter's LoRA to this file as diffusers' pipe.load_lora_weights reads it "
     "(the preference modules, the slider itself, need this code: they are not in that file)"),
    ("--port", int, "--serve: the port (default 7860; 0: any free one)"),
    ("--host", str, "--serve: the address to bind (default 127.0.0.1: this machine only; no authentication)"),
]  # fmt: skip


def cli():
    ap = argparse.ArgumentParser(description="Sample images from a ParetoSlider model at one ω or a sweep of ω.")
    for flag, kind, text in FLAGS:
        how = "action" if kind == "store_true" else "choices" if isinstance(kind, list) else "type"
        ap.add_argument(flag, help=text, **{how: kind})
    ap.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main(argv=None):
    args = cli().parse_args(argv)
    try:
        if args.kernels:
            import kernels

            kernels.set_backend(args.kernels)
        export(args) if args.export_diffusers else serve(args) if args.serve else run(args)
    except OSError as e:  # reading weights, images, run folders: the file and the reason, in one line
        why = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e
        print(f"sample.py: error: {why}", file=sys.stderr)
        sys.exit(2)
    except (UsageError, ValueError, RuntimeError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def spec_of(backbone):
    return model_module().BACKBONES[backbone]


def model_module():
    import model

    return model


def not_used(backbone):
    # the flags this backbone would ignore -> what they are for
    spec, own = spec_of(backbone), LOADERS[backbone].get("flags", {})
    other = {f: w for row in LOADERS.values() for f, w in row.get("flags", {}).items() if f not in own}
    if not spec.editing:
        other["--image"] = "a source to edit"
    if not spec.video:
        other.update({f: "videos" for f in ("--frames", "--fps", "--audio")})
    return other


def spec_geometry(backbone, spec):
    # model.geometry of a loader spec: a tiny run's spec names its tiny text encoders and its pixels per latent cell
    tiny = "tiny_text_encoders" in spec or "tiny_text_encoder" in spec
    return model_module().geometry(backbone, tiny, spec.get("pixels", 1))


def run_settings(args):
    """-> (backbone, spec, adapter path, objectives, {flag: default}, {flag: where the default comes from}): the run's
    sampling settings fill the flags left unset; a key the run's config.json lacks must then be given as a flag."""
    import model

    # dtype: bf16 on a GPU, fp32 on a CPU (what the base is stored and computes in; the adapters stay fp32 masters)
    gpu = torch.device(args.device).type == "cuda"
    # fmt: off
    defaults = dict(steps=28, solver="euler", shift=3.0, size=1024, out="out.png", seed=0, negative_prompt="",
                    port=7860, host="127.0.0.1", dtype="bf16" if gpu else "fp32")
    # fmt: on
    origin = {}
    if not args.run:
        if not args.weights:
            raise UsageError("give --run DIR (a train.py run folder) or --weights PATH")
        if not os.path.exists(args.weights):
            raise UsageError(f"--weights {args.weights}: no such file or folder")
        if args.lora and not os.path.isfile(args.lora):
            raise UsageError(f"--lora {args.lora}: no such file")
        if args.vae and not os.path.isfile(args.vae):
            raise UsageError(f"--vae {args.vae}: no such file")
        backbone = args.backbone or "sd35"
        spec = dict(weights=args.weights, text_encoders=args.text_encoders, t5=not args.no_t5, vae=args.vae)
        defaults.update(guidance=spec_of(backbone).guidance, **LOADERS[backbone].get("defaults", {}))
        return backbone, spec, args.lora, None, defaults, origin
    given = [f for f, v in (("--backbone", args.backbone), ("--vae", args.vae)) if v is not None]
    if given:
        raise UsageError(
            f"{given[0]}: --run {args.run} records its backbone and its base (--weights points at a moved base)"
        )
    config, adapter = os.path.join(args.run, "config.json"), os.path.join(args.run, "adapters.safetensors")
    if not os.path.isfile(config):
        raise UsageError(f"--run {args.run}: no config.json there (not a train.py run folder)")
    if not os.path.isfile(adapter):
        raise UsageError(f"--run {args.run}: no adapters.safetensors yet (the run has not saved a checkpoint)")
    cfg, meta = model.read_json(config), model.read_adapter_meta(adapter)
    if not isinstance(cfg, dict):
        raise UsageError(f"{config}: not a train.py config (a JSON object)")
    if "pipeline" not in meta:
        raise UsageError(f"{adapter}: the adapter does not record its base model; use --weights and --lora")
    backbone, lora, spec = meta["backbone"], args.lora or adapter, json.loads(meta["pipeline"])
    if args.lora:  # another adapter on this run's base: of the same backbone (its base config is checked at load)
        if not os.path.isfile(args.lora):
            raise UsageError(f"--lora {args.lora}: no such file")
        meta = model.read_adapter_meta(args.lora)
        if meta["backbone"] != backbone:
            raise UsageError(
                f"--lora {args.lora}: an adapter of backbone {meta['backbone']!r}; --run {args.run} is {backbone!r}"
            )
    if args.weights:  # the base moved: point at it
        spec = dict(spec, weights=args.weights)
    if args.text_encoders:
        spec = dict(spec, text_encoders=args.text_encoders)
    if args.no_t5:
        spec = dict(spec, t5=False)
    defaults.update(guidance=spec_of(backbone).guidance, **LOADERS[backbone].get("defaults", {}))
    keys = [("steps", "sample_steps"), ("solver", "solver"), ("shift", "shift"), ("size", "size")]
    if spec_of(backbone).video:
        keys += [("frames", "frames")]
    if spec_of(backbone).distilled:  # the run's guidance is the net's input it trained with (never CFG)
        keys += [("guidance", "guidance")]
    missing = [f"{c} (--{k})" for k, c in keys if c not in cfg and getattr(args, k) is None]
    if missing:
        raise UsageError(f"{config} lacks {', '.join(missing)} (hand-edited?): give the flag(s), or use an intact run")
    for k, c in keys:
        if c in cfg:
            defaults[k], origin[k] = cfg[c], f"{config}: {c}"
    return backbone, spec, lora, meta["objectives"], defaults, origin


def check_values(args, backbone, spec, origin):
    """The values sampling will use, flags or the run's config.json (origin names where each came from): refused when
    they can only give garbage (an image of noise, a black one, a crash far from its cause)."""

    def bad(k, rule):
        where = f"{origin[k]} = {getattr(args, k)!r}" if k in origin else f"--{k.replace('_', '-')} {getattr(args, k)}"
        raise UsageError(f"{where}: {rule}")

    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
    positive = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not (integer(args.steps) and 1 <= args.steps <= 10000):
        bad("steps", "must be an integer from 1 to 10000")
    for k in ("shift", "guidance"):
        if not positive(getattr(args, k)):
            bad(k, "must be a finite number > 0")
    if args.solver not in ("euler", "dpm2"):
        bad("solver", "must be euler or dpm2")
    if not (integer(args.seed) and 0 <= args.seed < 2**31):
        bad("seed", "must be an integer in [0, 2^31)")
    multiple, largest = spec_geometry(backbone, spec)
    if not (integer(args.size) and args.size >= multiple and args.size % multiple == 0):
        bad("size", f"{backbone} needs a positive multiple of {multiple} (its latent and patch grid)")
    if largest and args.size > largest:
        bad("size", f"at most {largest} for this model (its positional table)")
    if args.sweep is not None and not 2 <= args.sweep <= 64:
        bad("sweep", "needs N from 2 to 64")
    if spec_of(backbone).video:
        if not (integer(args.frames) and args.frames >= 1):
            bad("frames", "must be an integer >= 1")
        if not positive(args.fps):
            bad("fps", "must be a finite number > 0")
    for f, what in not_used(backbone).items():
        if getattr(args, f[2:].replace("-", "_")) not in (None, False):
            where = f"--run {args.run} is" if args.run else "backbone"
            raise UsageError(f"{f} is for {what}; {where} {backbone!r} does not use it")
    distilled = spec_of(backbone).distilled
    if args.negative_prompt and (distilled or args.guidance <= 1.0):
        raise UsageError(
            "--negative-prompt is the unconditional half of classifier-free guidance: it needs --guidance "
            "> 1" + (f" (and {backbone!r} is guidance-distilled: no CFG)" if distilled else "")
        )


def export(args):
    # --export-diffusers FILE: the adapter's LoRA in diffusers' format, for a run or --weights + --lora
    import model

    given = [f for f in ("prompt", "pref", "sweep", "image", "serve") if getattr(args, f)]
    if given:
        raise UsageError(f"--export-diffusers writes a file and samples nothing: drop --{given[0]}")
    backbone, spec, lora, objectives, _, _ = run_settings(args)
    if not lora:
        raise UsageError("--export-diffusers needs an adapter: --run DIR or --lora FILE")
    net = load_net(spec["weights"], lora, torch.float32, "cpu")
    write_file(args.export_diffusers, lambda tmp: model.export_lora_diffusers(net, tmp))
    print(
        f"wrote {args.export_diffusers}: the {backbone} LoRA for pipe.load_lora_weights (diffusers); the preference "
        f"modules{' for ' + ' / '.join(objectives) if objectives else ''} are not in it: the slider needs sample.py"
    )


def run(args):
    if not args.prompt:
        raise UsageError("--prompt is required (or --serve for the interactive page)")
    pipe, backbone, spec, objectives, prefs = prepare(args)
    m = pipe.net.cfg.pref_dim
    if prefs[0] is not None and m == 0:
        raise UsageError("this model has no preference input (pref_dim=0): pass its adapter with --lora")
    if prefs[0] is None and m > 0:  # pref=None turns the preference paths off: a mode the model never trained in
        names = f" {objectives}" if objectives else ""
        raise UsageError(
            f"this model was trained with a preference over {m} objectives{names}: pass --pref w1[,w2...] or --sweep N"
        )
    if prefs[0] is not None and len(prefs[0]) != m:
        raise UsageError(f"ω has {len(prefs[0])} entries but the model was trained with {m} objectives")
    cond, uncond = pipe.conditions([args.prompt], args.guidance, args.negative_prompt)  # the encoders leave the GPU
    if spec_of(backbone).video:
        return write_videos(pipe, args, cond, uncond, prefs, objectives)
    width = height = args.size
    source = None
    if args.image:  # Kontext: the reference latent joins the conditioning; the output takes its size
        width, height = source_size(args.source.size, args.size, spec)
        source = load_image(args.source, (width, height))
        cond["ref"] = pipe.to_latent(source.to(args.device))

    images = [pipe.with_flags(args, cond, uncond, p, (height, width), progress=True)[0] for p in prefs]
    if args.sweep:
        names = f"  ({objectives[0]} → {objectives[1]})" if objectives else ""
        labels = [pref_label(p) for p in prefs]
        if source is not None:  # the source first, then preservation -> adherence
            images, labels = [source[0]] + images, ["source"] + labels
        save_image(image_grid([images], labels), args.out)
        print(f"wrote {args.out} ({len(prefs)} values of ω{names})")
    else:
        save_image(to_pil(images[0]), args.out)
        print(f"wrote {args.out}")


def write_videos(pipe, args, cond, uncond, prefs, objectives):
    # one clip per ω -> the animated image (--sweep: every frame holds the N clips side by side, labelled with ω),
    # an .mp4 beside it where PyAV is installed and, with --audio, each clip's sound as a WAV beside it
    x0s = [pipe.with_flags(args, cond, uncond, p, progress=True, decode=False) for p in prefs]
    clips = [pipe.decode(x0)[0] for x0 in x0s]  # [T, 3, H, W] each
    frames = clips[0]
    if args.sweep:
        labels = [pref_label(p) for p in prefs]
        frames = [image_grid([[clip[t] for clip in clips]], labels) for t in range(len(frames))]
    written = save_video(frames, args.out, args.fps)
    if args.audio:
        stem = os.path.splitext(args.out)[0]
        for i, x0 in enumerate(x0s):
            wav, rate = pipe.audio(x0)
            written.append(f"{stem}.wav" if len(x0s) == 1 else f"{stem}_{i}.wav")  # _i: the i-th ω of the sweep
            save_wav(wav[0], written[-1], rate)
    names = (f" ({objectives[0]} → {objectives[1]})" if objectives else "") if args.sweep else ""
    names = f", {len(prefs)} values of ω{names}" if args.sweep else ""
    print(f"wrote {', '.join(written)} ({len(frames)} frames at {args.fps:g} fps{names})")


def check_video_args(args, backbone, spec):
    # a clip, before anything loads (its side: check_values): the release VAE compresses time; the tiny net in pixel
    # space takes any frame count
    ft = spec_of(backbone).vae[0]
    if spec.get("pixels"):
        if args.audio:
            raise UsageError("--audio: the tiny LTX-2 has no audio VAE or vocoder (its audio latent is a toy signal)")
    elif (args.frames - 1) % ft:
        raise UsageError(f"--frames {args.frames}: {backbone} needs {ft}k+1 frames (its VAE compresses time {ft}x)")
    if not args.serve and not args.out.lower().endswith((".webp", ".gif")):
        raise UsageError(f"--out {args.out}: a video is written as an animated .webp or .gif")


def source_size(wh, size, spec):
    # the size an edit comes out at: a tiny pixel-space run's own size, else the nearest Kontext resolution
    return (size, size) if spec.get("pixels") else kontext_resolution(*wh)


def prepare(args):
    """Everything cheap checked before anything loads, then the pipeline. -> (pipe, backbone, spec, objectives,
    the ω list of --pref / --sweep ([None] if neither)); the run's settings fill the flags left unset."""
    if args.pref is not None and args.sweep is not None:
        raise UsageError("give either --pref or --sweep, not both")
    if args.pref is not None and not args.pref.strip():
        raise UsageError("--pref is empty: give w1 (two objectives) or a full vector like 0.2,0.3,0.5")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here")
    if not args.serve and (args.port is not None or args.host is not None):
        raise UsageError(f"{'--port' if args.port is not None else '--host'} is for --serve")
    backbone, spec, lora, objectives, defaults, origin = run_settings(args)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        else:
            origin.pop(k, None)
    check_values(args, backbone, spec, origin)
    prefs = [parse_pref(args.pref)] if args.pref else [None]
    if args.sweep:
        prefs = [[1 - i / (args.sweep - 1), i / (args.sweep - 1)] for i in range(args.sweep)]
    if spec_of(backbone).video:
        check_video_args(args, backbone, spec)
        spec = dict(spec, fps=args.fps, audio=args.audio)
    elif not args.serve and not image_format(args.out):
        raise UsageError(f"--out {args.out}: not an image file name PIL knows (use .png, .jpg or .webp)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: the folder does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out {args.out}: the folder {out_dir} is not writable")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: a folder; give a file name")
    if backbone not in LOADERS:
        raise UsageError(f"backbone {backbone!r} has no loader here (available: {', '.join(sorted(LOADERS))})")

    if args.image:  # read now, before anything loads
        if not os.path.isfile(args.image):
            raise UsageError(f"--image {args.image}: no such file")
        args.source = open_image(args.image, f"--image {args.image}")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    pipe = LOADERS[backbone]["load"](spec, dtype, args.device, lora)
    if args.compile:
        pipe.net.compile_blocks()
    m = pipe.net.cfg.pref_dim
    if args.sweep and m not in (0, 2):
        raise UsageError(f"--sweep moves ω between two objectives; this model has {m}: use --pref")
    return pipe, backbone, spec, objectives, prefs


# ----------------------------------------------------------------------------------------------------------------
# The slider you can drag: `--serve` starts a local page (standard library only) that regenerates as ω moves.
# One model instance behind a lock (no concurrent forwards); each page sends (client, seq) with a request, and a
# request older than that client's newest is answered 409 without sampling (the last request wins while the user
# drags); results are cached per (prompt, seed, ω, source); bad input is a 4xx with a one-line reason.

MAX_UPLOAD = 8 << 20  # bytes of a request body (an uploaded source image, base64) we accept


class Slider:
    """The model behind the page: render(prompt, seed, ω, source PNG bytes or None) -> PNG bytes (a video backbone: an
    animated WebP), cached."""

    def __init__(self, pipe, args, info, cache_size=256):
        import threading
        from collections import OrderedDict

        self.pipe, self.args, self.info = pipe, args, info
        self.mime = "image/webp" if info["video"] else "image/png"
        self.lock, self.cache, self.cache_size = threading.Lock(), OrderedDict(), cache_size
        self.cache_lock = threading.Lock()  # the cache and `newest` are read by every request thread
        self.newest = {}  # client -> its newest request number
        self.conds = OrderedDict()  # prompt -> its (cond, uncond), the 8 used last (read under self.lock)

    def check(self, prompt, pref, source):
        # -> the request's ω as a list, or UsageError with the reason (answered 400)
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 500:
            raise UsageError("the prompt must be a non-empty string (at most 500 characters)")
        m = self.info["pref_dim"]
        if m:
            if not isinstance(pref, list) or len(pref) != m or not all(isinstance(v, (int, float)) for v in pref):
                raise UsageError(f"ω must be a list of {m} numbers")
            if min(pref) < 0 or abs(sum(pref) - 1) > 1e-3 or any(v != v for v in pref):
                raise UsageError(f"ω = {pref} is not on the simplex (non-negative, summing to 1)")
        if self.info["editing"] and source is None:
            raise UsageError("this model edits images: upload a source image first")
        return [float(v) for v in pref] if m else None

    def stale(self, client, seq):
        # a request is stale when the same page has sent a newer one since (dropped while the user drags)
        return client is not None and seq is not None and seq < self.newest.get(client, seq)

    def render(self, prompt, seed, pref, source=None, client=None, seq=None):
        """-> (PNG bytes, "hit" | "miss"), or None when the request went stale while it waited for the model."""
        import hashlib
        import io

        w = self.check(prompt, pref, source)
        key = (
            prompt.strip(),
            int(seed),
            tuple(round(v, 4) for v in w or ()),
            hashlib.sha1(source).hexdigest() if source else None,
        )
        with self.cache_lock:
            if client is not None and seq is not None:
                self.newest[client] = max(seq, self.newest.get(client, seq))
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key], "hit"
        with self.lock:  # one forward at a time
            with self.cache_lock:
                if self.stale(client, seq):
                    return None
                if key in self.cache:  # rendered by the request we waited for
                    return self.cache[key], "hit"
            a = self.args
            if key[0] not in self.conds:  # the last few prompts' encodings: the text encoders visit the GPU once each
                self.conds[key[0]] = self.pipe.conditions([key[0]], a.guidance, a.negative_prompt)
                while len(self.conds) > 8:
                    self.conds.popitem(last=False)
            self.conds.move_to_end(key[0])  # least recently used first out
            cond, uncond = self.conds[key[0]]
            cond = dict(cond)  # the source image joins this request's copy
            width = height = a.size
            if source is not None:
                upload = open_image(io.BytesIO(source), "the uploaded source")
                width, height = source_size(upload.size, a.size, self.info["spec"])
                img = load_image(upload, (width, height))
                cond["ref"] = self.pipe.to_latent(img.to(a.device))
            x = self.pipe.with_flags(a, cond, uncond, w, (height, width), seed=key[1])[0]
            buf = io.BytesIO()
            if self.info["video"]:  # a clip [T,3,H,W]: the page's <img> plays an animated WebP
                save_animation([to_pil(f) for f in x], buf, a.fps, format="WEBP")
            else:
                to_pil(x).save(buf, format="PNG")
            with self.cache_lock:
                self.cache[key] = buf.getvalue()
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
            return buf.getvalue(), "miss"


LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = Path(__file__).with_name("serve.html")  # the slider page: HTML and its script; __INFO__ becomes the run's JSON


def page_json(obj):
    # JSON that can sit inside <script>: no "</script>", "<!--" or "]]>" can close or comment it out, whatever the
    # strings hold (objective names and paths come from files a user may have downloaded)
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def allowed_host(host_header, bound, port):
    """The request's Host must name this server: a loopback name or the bound address, with its port. A page of
    another site that makes a browser resolve its own name to this machine (DNS rebinding) sends that name, and is
    refused. Bound to every interface, any IP address is taken (a rebinding needs a name)."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        u = urlsplit("//" + (host_header or ""))
        name, p = u.hostname, u.port
    except ValueError:
        return False
    if name is None or (p or 80) != port:
        return False
    if name in LOOPBACK or name == bound:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return bound in ("0.0.0.0", "::", "")


def make_server(slider, host="127.0.0.1", port=7860, timeout=30.0):
    """A ThreadingHTTPServer for the page (PageHandler) around `slider`; a client slower than `timeout` seconds per
    read loses its connection."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer((host, port), PageHandler)
    server.daemon_threads, server.slider, server.request_timeout = True, slider, timeout
    return server


class PageHandler(BaseHTTPRequestHandler):
    """GET / (the page), GET /info (the run, JSON), POST /render ({prompt, seed, pref, source: data URL, client, seq}
    -> the image; 409 when stale). Never raises out of a request. Trusts no request: a foreign Host or Origin is 403, a
    body that is not JSON 415, errors are sentences (the details go to this process's stderr)."""

    def setup(self):
        self.timeout = self.server.request_timeout  # set on the socket: a stalled read ends the handler
        super().setup()

    def log_message(self, fmt, *a):  # quiet: one line per render is printed by do_POST
        pass

    def foreign(self):
        # -> a reason to refuse this request (403), or None: the Host names this server, an Origin is this page's
        bound, port = self.server.server_address[:2]
        if not allowed_host(self.headers.get("Host"), bound, port):
            return f"Host {self.headers.get('Host')!r} is not this server"
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host')}":
            return f"requests from {origin!r} are refused (another site)"
        return None

    def send(self, code, body, ctype="application/json", headers=()):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        for k, v in [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                     ("X-Content-Type-Options", "nosniff"), *headers]:  # fmt: skip
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        info = {k: v for k, v in self.server.slider.info.items() if k != "spec"}
        if reason := self.foreign():
            return self.send(403, {"error": reason})
        if self.path in ("/", "/index.html"):  # never inside another site's frame
            frames = [("X-Frame-Options", "DENY"), ("Content-Security-Policy", "frame-ancestors 'none'")]
            page = PAGE.read_text().replace("__INFO__", page_json(info))
            return self.send(200, page.encode(), "text/html; charset=utf-8", frames)
        if self.path == "/info":
            return self.send(200, info)
        self.send(404, {"error": "no such page (the slider is at /)"})

    def do_POST(self):
        if reason := self.foreign():
            return self.send(403, {"error": reason})
        if self.path != "/render":
            return self.send(404, {"error": "no such endpoint (the page posts to /render)"})
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            self.close_connection = True
            return self.send(415, {"error": "the request body must be JSON (Content-Type: application/json)"})
        n = self.headers.get("Content-Length", "")
        if not n.isdigit():
            self.close_connection = True
            return self.send(400, {"error": "a request needs a Content-Length of 0 or more bytes"})
        if int(n) > MAX_UPLOAD:
            if int(n) <= 4 * MAX_UPLOAD:  # read it away, so the client hears the answer instead of a broken pipe
                left = int(n)
                while left > 0:
                    left -= len(self.rfile.read(min(1 << 16, left)) or b"x" * left)  # (EOF: stop)
            self.close_connection = True
            return self.send(413, {"error": f"request of {n} bytes; at most {MAX_UPLOAD} (a smaller image)"})
        try:
            code, body, headers = self.render(int(n))
        except TimeoutError:
            self.close_connection = True
            code, body, headers = 408, {"error": "the request body did not arrive in time"}, ()
        self.send(code, body, self.server.slider.mime if code == 200 else "application/json", headers)

    def render(self, n):
        # -> (status, body, headers) of a render request of n bytes
        import time

        try:
            body = self.rfile.read(n)
            if len(body) != n:
                raise UsageError(f"the body ended after {len(body)} of its {n} bytes")
            req = json.loads(body or b"null")
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
            src = req.get("source")
            if src is not None:
                if not isinstance(src, str) or "," not in src:
                    raise UsageError("source must be a data URL (data:image/png;base64,...)")
                src = base64.b64decode(src.split(",", 1)[1], validate=True)
            seed = req.get("seed", 0)
            if not isinstance(seed, int) or not 0 <= seed < 2**31:
                raise UsageError("seed must be an integer in [0, 2^31)")
            t0 = time.perf_counter()
            out = self.server.slider.render(req.get("prompt"), seed, req.get("pref"), src, req.get("client"),
                                            req.get("seq"))  # fmt: skip
        except UsageError as e:
            return 400, {"error": str(e)}, ()
        except (ValueError, TypeError, binascii.Error):
            return (
                400,
                {"error": "the request is not the JSON object the page sends ({prompt, seed, pref, source})"},
                (),
            )
        except TimeoutError:
            raise
        except Exception:  # never take the server down with a request; the details are for the server's log
            traceback.print_exc()
            return 500, {"error": "the model failed on this request (the server's log has the details)"}, ()
        if out is None:
            return 409, {"error": "stale: a newer request from this page superseded it"}, ()
        image, cache = out
        ms = 1000 * (time.perf_counter() - t0)
        print(f"render {req.get('prompt')!r} seed {seed} ω {req.get('pref')}: {cache}, {ms:.0f} ms", flush=True)
        return 200, image, [("X-Cache", cache), ("X-Render-Ms", f"{ms:.1f}")]


def run_info(pipe, backbone, spec, objectives, args):
    # what the page says about the run it serves: backbone, objectives, step, hypervolume (from the run folder)
    info = dict(backbone=backbone, objectives=objectives or [], pref_dim=pipe.net.cfg.pref_dim, spec=spec)
    info.update(editing=pipe.to_latent is not None, video=spec_of(backbone).video, run=args.run or args.weights)
    info.update(size=args.size, steps=args.steps, step=None, hypervolume=None)
    if args.run:
        import model

        ev, ck = os.path.join(args.run, "eval.json"), os.path.join(args.run, "checkpoint.safetensors")
        if os.path.isfile(ev):
            info["hypervolume"] = model.read_json(ev).get("hypervolume")
        if os.path.isfile(ck):
            info["step"] = int(model.read_safetensors_meta(ck).get("step", 0))
    return info


def serve(args):
    if args.pref or args.sweep or args.image or args.prompt:
        raise UsageError("--serve takes ω, the prompt and the source image from the page, not from flags")
    if args.port is not None and not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port")
    pipe, backbone, spec, objectives, _ = prepare(args)
    if args.host not in LOOPBACK:
        print(
            f"warning: --host {args.host} serves the page beyond this machine; it has no authentication: anyone "
            "who reaches the port can use the model",
            file=sys.stderr,
            flush=True,
        )
    slider = Slider(pipe, args, run_info(pipe, backbone, spec, objectives, args))
    try:
        server = make_server(slider, args.host, args.port)
    except OSError as e:
        raise UsageError(
            f"--port {args.port}: {e.strerror} (another server there? --port 0 picks a free one)"
        ) from None
    host, port = server.server_address[:2]
    print(
        f"serving {slider.info['run']} ({backbone}, objectives {objectives}) at http://{host}:{port}/  (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
