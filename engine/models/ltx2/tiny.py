"""Tiny random LTX-2 models in the real diffusers layout.

The tiny models exist so that every LTX-2 code path -- Gemma 3 text encoding, the text
connectors, the joint video + audio transformer (a2v / v2a cross-attention, STG, modality
guidance), I2V first-frame conditioning, the video VAE, the audio VAE and the vocoder -- can run
on a CPU in seconds, with nothing downloaded. They are written exactly like a
``Lightricks/LTX-2`` snapshot (``model_index.json`` plus one folder per component, each saved by
its own library) and load back through ``LTX2Pipeline`` / ``LTX2ImageToVideoPipeline``; the two
kinds share every component, so their folders differ only in ``model_index.json``'s
``_class_name``.

Shapes follow LTX-2.0 (``use_prompt_embeddings``, one shared text projection in the connectors,
``LTX2Vocoder``) with every ratio kept: the video VAE compresses 32x spatially and 8x temporally
(so sizes are multiples of 32 and frame counts ``8k + 1``), the audio VAE 4x in time and mel
bins, the vocoder turns 16 kHz mel frames (hop 160) into 24 kHz stereo. The transformer's
attention is the perturbable one (``perturbed_attn``), so spatio-temporal guidance changes the
output. The tokenizer is a small BPE (byte fallback, as Gemma's) trained in code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

KINDS = ("ti2v", "t2v", "i2v")
#: The ``model_index.json`` pipeline class of each kind (Relay reads all three folders as one
#: ``ti2v`` model: text, and an optional first image; ``ti2v`` is what ``relay make-tiny --kind
#: ltx2`` writes, a folder like the published ``Lightricks/LTX-2``).
PIPELINE_CLASSES = {"ti2v": "LTX2Pipeline", "t2v": "LTX2Pipeline", "i2v": "LTX2ImageToVideoPipeline"}

#: Generation defaults written to ``relay.json`` in a tiny model directory; sized so that a
#: generation takes seconds on a laptop CPU. 64 is the smallest side the video VAE decodes: at
#: 32 the latent is 1x1 and the decoder's reflect padding needs at least 2.
TINY_DEFAULTS = {kind: {"height": 64, "width": 64, "frames": 9, "steps": 4, "fps": 24} for kind in KINDS}

_WORDS = (
    "a an the of in on at with and is cat dog bird fish horse city street forest river ocean sky "
    "sun moon night day red blue green golden slow fast camera pan zoom walking running flying "
    "swimming dancing over under through beautiful cinematic shot close up wide view light shadow "
    "rain snow fire water mountain tree flower car train boat person man woman child robot "
    "music voice speaks sings laughs footsteps wind thunder birdsong crowd engine quiet loud"
).split()

#: Gemma's special tokens, in Gemma's order where Gemma has them (pad 0, eos 1, bos 2, unk 3,
#: mask 4), then the chat-turn and image markers Gemma 3 defines. Byte-fallback pieces follow.
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                   "<start_of_image>", "<end_of_image>", "<image_soft_token>")


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Sizes of a tiny model. The transformer's and connectors' attention heads are 4, so that
    sequence-parallel degrees 2 and 4 divide them (the video and audio streams must have equal
    head counts: the a2v / v2a rotary embedding splits the audio width over the video heads)."""

    kind: str = "ti2v"
    seed: int = 0
    # Transformer: video inner width 4 x 16 = 64, audio 4 x 8 = 32.
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    audio_attention_head_dim: int = 8
    num_layers: int = 2
    # Text: a 2-layer Gemma 3 of width 32 (so the connectors see 3 hidden states of 32).
    text_dim: int = 32
    text_layers: int = 2
    vocab_size: int = 160
    # Connectors: inner width 4 x 8 must equal the Gemma width; 8 registers divide any text
    # length that is a multiple of 8 (LTX-2 pads prompts to ``max_sequence_length``, 1024).
    connector_heads: int = 4
    connector_head_dim: int = 8
    connector_registers: int = 8
    # Video VAE: latent channels (= transformer in_channels, patch size 1).
    latent_channels: int = 16
    # Audio VAE: latent channels x (mel bins / 4) = audio tokens' width = the VAE base width
    # (its per-channel statistics are applied to the packed audio tokens).
    audio_latent_channels: int = 4
    mel_bins: int = 16
    max_sequence_length: int = 1024


def build_tokenizer(vocab_size: int, *, max_length: int = 1024):
    """Trains a tiny Gemma-style BPE tokenizer in memory (no download).

    Gemma's tokenizer is a byte-fallback BPE; transformers 5's ``GemmaTokenizer`` is built from a
    ``vocab`` dict and ``merges``. The merges are learned here with ``tokenizers``' BPE trainer
    under Gemma's own normalizer (spaces to ``▁``), deterministically. Ids follow Gemma: pad=0,
    eos=1, bos=2, unk=3, mask=4, then the Gemma 3 turn / image markers, the 256 ``<0xNN>``
    byte pieces (so any text encodes without ``<unk>``), then the learned pieces. A ``<bos>`` is
    prepended, padding is on the left (what ``LTX2Pipeline`` sets and expects).

    Args:
        vocab_size: Size of the learned part (characters and merges) of the vocabulary.
        max_length: ``model_max_length`` of the tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    rng = random.Random(1234)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                  show_progress=False)
    bpe.train_from_iterator(sentences, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                          padding_side="left", model_max_length=max_length)


def _text_encoder(spec: TinySpec, tokenizer):
    """A tiny ``Gemma3ForConditionalGeneration`` (what LTX-2 loads; the pipeline reads all of its
    hidden states). The SigLIP tower is the smallest that fits Gemma 3's projector."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)

    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_dim, intermediate_size=2 * spec.text_dim,
        num_hidden_layers=spec.text_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=512, max_position_embeddings=4096,
        layer_types=["sliding_attention"] * (spec.text_layers - 1) + ["full_attention"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return Gemma3ForConditionalGeneration(config).eval()


def _connectors(spec: TinySpec):
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return LTX2TextConnectors(
        caption_channels=spec.text_dim, text_proj_in_factor=spec.text_layers + 1,
        video_connector_num_attention_heads=spec.connector_heads,
        video_connector_attention_head_dim=spec.connector_head_dim, video_connector_num_layers=2,
        video_connector_num_learnable_registers=spec.connector_registers,
        audio_connector_num_attention_heads=spec.connector_heads,
        audio_connector_attention_head_dim=spec.connector_head_dim, audio_connector_num_layers=2,
        audio_connector_num_learnable_registers=spec.connector_registers,
        connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
        causal_temporal_positioning=False, rope_type="split", per_modality_projections=False,
        proj_bias=False,
    ).eval()


def _transformer(spec: TinySpec):
    from diffusers import LTX2VideoTransformer3DModel

    heads = spec.num_attention_heads
    audio_width = spec.audio_latent_channels * (spec.mel_bins // 4)  # packed audio token width
    return LTX2VideoTransformer3DModel(
        in_channels=spec.latent_channels, out_channels=spec.latent_channels, patch_size=1, patch_size_t=1,
        num_attention_heads=heads, attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=heads * spec.attention_head_dim, vae_scale_factors=(8, 32, 32),
        pos_embed_max_pos=20, base_height=2048, base_width=2048,
        audio_in_channels=audio_width, audio_out_channels=audio_width, audio_patch_size=1,
        audio_patch_size_t=1, audio_num_attention_heads=heads,
        audio_attention_head_dim=spec.audio_attention_head_dim,
        audio_cross_attention_dim=heads * spec.audio_attention_head_dim, audio_scale_factor=4,
        audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160,
        num_layers=spec.num_layers, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=spec.text_dim, attention_bias=True,
        attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True, causal_offset=1,
        timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000, rope_type="split",
        use_prompt_embeddings=True, perturbed_attn=True,
    ).eval()


def _vae(spec: TinySpec):
    """The LTX-2.0 video VAE's block structure (patch 4; encoder spatial, temporal and two
    spatio-temporal 2x downsamplers; decoder three residual 2x2x2 upsamplers) at tiny widths."""
    from diffusers import AutoencoderKLLTX2Video

    return AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        block_out_channels=(16, 32, 32, 64), down_block_types=("LTX2VideoDownBlock3D",) * 4,
        decoder_block_out_channels=(16, 32, 64), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal",) * 3, upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2), timestep_conditioning=False, patch_size=4, patch_size_t=1,
        resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode="reflect", spatial_compression_ratio=32, temporal_compression_ratio=8,
    ).eval()


def _audio_vae(spec: TinySpec):
    """The LTX-2.0 audio VAE (two 2x stages: 4x in time and mel bins) at tiny widths."""
    from diffusers import AutoencoderKLLTX2Audio

    return AutoencoderKLLTX2Audio(
        base_channels=spec.audio_latent_channels * (spec.mel_bins // 4), output_channels=2, ch_mult=(1, 2, 4),
        num_res_blocks=1, attn_resolutions=None, in_channels=2, resolution=256,
        latent_channels=spec.audio_latent_channels, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True,
        mel_bins=spec.mel_bins, double_z=True,
    ).eval()


#: Gain applied to the vocoder's random conv weights. With default initialisation each of its
#: conv layers shrinks the signal, so the waveform is all biases: two different audio latents give
#: waveforms ~1e-4 apart and a wrong audio stream would hide under a test tolerance. At 2 the part
#: of the waveform that follows the mel spectrogram is most of it, with no tanh saturation.
VOCODER_GAIN = 2.0


def _vocoder(spec: TinySpec):
    """The LTX-2.0 vocoder's upsampling (6 x 5 x 2 x 2 x 2 = 240: 100 mel frames/s to 24 kHz)."""
    import torch
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    vocoder = LTX2Vocoder(
        in_channels=2 * spec.mel_bins, hidden_channels=64, out_channels=2,
        upsample_kernel_sizes=[16, 15, 8, 4, 4], upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3, 7],
        resnet_dilations=[[1, 3, 5], [1, 3, 5]],
        act_fn="leaky_relu", leaky_relu_negative_slope=0.1, antialias=False, final_act_fn="tanh",
        final_bias=True, output_sampling_rate=24000,
    ).eval()
    with torch.no_grad():
        for param in vocoder.parameters():
            if param.dim() > 1:
                param.mul_(VOCODER_GAIN)
    return vocoder


def _scheduler():
    """LTX-2's flow-match Euler: resolution-dependent (exponential) shift, stretched to 0.1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential",
    )


def make_tiny(directory: str | Path, *, kind: str = "ti2v", seed: int = 0) -> Path:
    """Writes a random tiny LTX-2 model of ``kind`` to ``directory`` in the diffusers layout.

    Args:
        directory: Target folder; created if missing. Existing component folders are replaced.
        kind: ``ti2v`` or ``t2v`` (``LTX2Pipeline``), or ``i2v`` (``LTX2ImageToVideoPipeline``). The
            components are the same; only ``model_index.json`` differs.
        seed: Seed for the random weights (the same seed gives the same weights for both kinds).

    Returns:
        The directory, as a ``Path``.
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = TinySpec(kind=kind, seed=seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, max_length=spec.max_sequence_length)
    torch.manual_seed(seed)
    components = {
        "tokenizer": tokenizer,
        "text_encoder": _text_encoder(spec, tokenizer),
        "connectors": _connectors(spec),
        "transformer": _transformer(spec),
        "vae": _vae(spec),
        "audio_vae": _audio_vae(spec),
        "vocoder": _vocoder(spec),
        "scheduler": _scheduler(),
    }
    _save(out, kind, components)
    relay = {"defaults": TINY_DEFAULTS[kind], "tiny": True}
    (out / "relay.json").write_text(json.dumps(relay, indent=2) + "\n")
    return out


def _save(out: Path, kind: str, components: dict) -> None:
    """Saves the components through diffusers itself so that the layout is the real one."""
    import diffusers

    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[kind])
    pipe = pipeline_class(processor=None, prompt_enhancer=None, duration_head=None, **components)
    pipe.save_pretrained(out, safe_serialization=True)
