"""Tiny random diffusers-layout folders of the three backbones, for the tests of the full-size path (train.py and
sample.py with --weights): every part a real diffusers / transformers class at a tiny config, saved as the released
repositories lay them out."""

from types import SimpleNamespace

import torch

import model
import rewards as R
import sample


def save_parts(root, parts):
    # {subfolder: anything with save_pretrained} -> root/subfolder/
    for name, m in parts.items():
        m.save_pretrained(root / name)


def sd35_text_encoders(enc):
    # tiny SD3.5 text encoders (sample.tiny_text_encoders) as the diffusers folder names them
    return dict(
        text_encoder=enc.clip_l,
        text_encoder_2=enc.clip_g,
        text_encoder_3=enc.t5,
        tokenizer=enc.tok_l,
        tokenizer_2=enc.tok_g,
        tokenizer_3=enc.tok_t5,
    )


def vae16(**kw):
    # the 16-channel AutoencoderKL of SD3.5 and FLUX (kw: its latent scaling and shift), four levels of 8 channels
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **kw,
    )


def sd35_repo(d):
    # SD3.5: transformer/ (MMDiT-X, 2 blocks, dual attention in block 0), vae/, three text encoders, tokenizers, and a
    # prompts.txt beside them
    import diffusers

    enc = sample.tiny_text_encoders(["a"] + R.COLORS + R.SHAPES, clip_dims=(16, 16), t5_dim=32, clip_len=8, t5_len=4)
    torch.manual_seed(0)
    tr = diffusers.SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    save_parts(d, dict(sd35_text_encoders(enc), transformer=tr, vae=vae16(scaling_factor=1.5305, shift_factor=0.0609)))
    (d / "prompts.txt").write_text("a red circle\na blue square\na green ring\n")


def flux_repo(d):
    # FLUX.1 Kontext: transformer/ (1 double + 1 single block, guidance-distilled), vae/ (FLUX's latent constants),
    # text_encoder/ = CLIP-L, text_encoder_2/ = T5 (16 tokens instead of 512), tokenizers, and an edit set edits/
    # (x.png + x.txt pairs from the tiny editing world) beside them
    import diffusers

    enc = sample.tiny_flux_text_encoders(
        sorted({w for t in R.EDIT_INSTRUCTIONS for w in t.split()}), clip_dim=32, t5_dim=32, t5_len=16
    )
    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    save_parts(
        d,
        dict(
            transformer=tr,
            vae=vae16(scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=enc.clip,
            tokenizer=enc.tok_clip,
            text_encoder_2=enc.t5,
            tokenizer_2=enc.tok_t5,
        ),
    )
    sources, texts, _ = R.tiny_edit_world(3, size=32, seed=0)
    (d / "edits").mkdir()
    for i, (img, text) in enumerate(zip(sources, texts)):
        sample.to_pil(img).save(d / "edits" / f"{i}.png")
        (d / "edits" / f"{i}.txt").write_text(text)


# -------------------------------------------------------------------------------------------------------------------
# a tiny LTX-2 in the diffusers layout: Gemma-3 (16 wide, 2 layers: 3 stacked states), connectors, transformer, video
# VAE (8 latent channels, the release's 8 x 32 x 32 compression), audio VAE (8 x 4 latent mel bins), vocoder (40
# samples per mel frame). Random weights everywhere, so that no term hides behind an init.

GEMMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=1024,
    sliding_window=4,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
CONNECTORS = dict(
    caption_channels=16,
    text_proj_in_factor=3,
    video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=8,
    video_connector_num_layers=2,
    video_connector_num_learnable_registers=4,
    audio_connector_num_attention_heads=4,
    audio_connector_attention_head_dim=4,
    audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=2,
    rope_type="split",
    rope_double_precision=True,
)
CONNECTORS_META = dict(
    rope_type="split",
    frequencies_precision="float64",  # the same in the combined file's metadata
    connector_positional_embedding_max_pos=[4096],
    connector_num_attention_heads=2,
    connector_attention_head_dim=8,
    audio_connector_num_attention_heads=4,
    audio_connector_attention_head_dim=4,
)
TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    audio_in_channels=32,
    audio_out_channels=32,
    audio_num_attention_heads=2,
    audio_attention_head_dim=8,
    audio_cross_attention_dim=16,
    num_layers=2,
    caption_channels=16,
    rope_type="split",
    rope_double_precision=True,
    timestep_scale_multiplier=1000,
    cross_attn_timestep_scale_multiplier=1000,
)
VAE = dict(
    latent_channels=8,
    block_out_channels=(8, 16, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    layers_per_block=(1, 1, 2, 1, 1),
    decoder_layers_per_block=(1, 2, 1, 1),
    decoder_causal=False,
)
AUDIO_VAE = dict(base_channels=32, ch_mult=(2, 3, 4), num_res_blocks=1, latent_channels=8, mel_bins=16)
VOCAB = ["a", "red", "blue", "green", "circle", "ring", "square", "photo", "sketch", "of"]
VOCODER = dict(in_channels=32, hidden_channels=32, upsample_kernel_sizes=[11, 8, 4], upsample_factors=[5, 4, 2])


def randomize(m, scale, std_key=None):
    with torch.no_grad():
        for k, p in m.state_dict().items():
            p.copy_(torch.rand_like(p) + 0.5 if k == std_key else torch.randn_like(p) * scale)
    return m.eval()


def tiny_gemma():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    ids = sample._tiny_vocab(VOCAB)
    n = len(ids)  # the image tokens sit past the words; a text prompt never holds them
    cfg = Gemma3Config(
        text_config=dict(GEMMA, vocab_size=n + 3),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=n,
        eoi_token_index=n + 1,
        image_token_index=n + 2,
    )
    torch.manual_seed(0)
    gemma = Gemma3ForConditionalGeneration(cfg).eval()
    tok = sample._tiny_tokenizer(ids, "<|startoftext|> $A", 1024)
    tok.padding_side = "left"
    return gemma, tok


def ltx2_repo(root):
    # -> the parts (and root): Gemma-3 and its tokenizer, connectors, transformer, video VAE, audio VAE, vocoder
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    gemma, tok = tiny_gemma()
    torch.manual_seed(1)
    parts = dict(
        connectors=randomize(LTX2TextConnectors(**CONNECTORS), 0.3),
        transformer=randomize(LTX2VideoTransformer3DModel(**TRANSFORMER), 0.2),
        vae=randomize(AutoencoderKLLTX2Video(**VAE), 0.2, "latents_std"),
        audio_vae=randomize(AutoencoderKLLTX2Audio(**AUDIO_VAE), 0.2, "latents_std"),
        vocoder=randomize(LTX2Vocoder(**VOCODER), 0.1),
    )
    save_parts(root, dict(parts, text_encoder=gemma, tokenizer=tok))
    (root / "prompts.txt").write_text("a red circle\na blue ring\n")
    return SimpleNamespace(root=root, gemma=gemma, tok=tok, **parts)


# ---------------------------------------------------------------------------------------------------------------------
# our (original) keys -> diffusers': the inverse of each backbone's from_diffusers mapping, to build folders and compare


def sd3_to_diffusers(sd, depth):
    """Inverse of model.sd3_from_diffusers."""
    fwd, out = model.sd3_key_map(depth), {}
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if k == "pos_embed":
            out["pos_embed.pos_embed"] = v
        elif stem in fwd:
            out[f"{fwd[stem]}.{leaf}"] = model._swap_halves(v) if model._swapped(k, depth) else v
        else:
            i, rest = stem.split(".", 2)[1], stem.split(".", 2)[2]
            for n, t in zip(model.SD3_QKV[rest], v.chunk(3)):
                out[f"transformer_blocks.{i}.{n}.{leaf}"] = t
    return out


def flux_to_diffusers(sd, cfg):
    """Inverse of model.flux_from_diffusers: fused tensors split as q, k, v (| mlp-in) along the output."""
    out, D = {}, cfg.hidden
    for ours, theirs, swap in model._flux_tensors(cfg):
        if ours in sd:
            t = model._swap_halves(sd[ours]) if swap else sd[ours]
            parts = t.split([D, D, D, t.shape[0] - 3 * D][: len(theirs)]) if len(theirs) > 1 else (t,)
            out.update(zip(theirs, parts))
    return out


def ltx2_to_diffusers(sd, cfg=None):
    return {model.ltx2_key(k): v for k, v in sd.items()}
