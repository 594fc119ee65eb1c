"""Tiny random Wan 2.2 models in the real diffusers layout.

The tiny models exist so that every code path -- loading, text encoding, the MoE expert switch,
I2V conditioning, TI2V's per-token timesteps, VAE decode -- can run on a CPU in a second, with
nothing downloaded. They are written exactly like a ``Wan-AI/Wan2.2-*-Diffusers`` snapshot
(``model_index.json`` plus one folder per component) and are loaded back through the same
loader as a real model. The tokenizer is a small sentencepiece unigram model trained in code.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("t2v", "i2v", "ti2v")

#: Generation defaults written to ``relay.json`` in a tiny model directory; sized so that a
#: generation takes seconds on a laptop CPU. The flow shift is the folder's own (its scheduler
#: config), as in a released folder.
TINY_DEFAULTS = {kind: {"height": 64, "width": 64, "frames": 9, "steps": 8, "fps": 8} for kind in KINDS}
#: Flow shift of the tiny models' scheduler config: not a Wan 2.2 table value (12 or 5), so a
#: default that ignored the folder would show.
TINY_SHIFT = 3.0

_WORDS = (
    "a an the of in on at with and is cat dog bird fish horse city street forest river ocean sky "
    "sun moon night day red blue green golden slow fast camera pan zoom walking running flying "
    "swimming dancing over under through beautiful cinematic shot close up wide view light shadow "
    "rain snow fire water mountain tree flower car train boat person man woman child robot "
    "astronaut sunset sunrise waves clouds neon glowing quiet busy"
).split()


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    """Sizes of a tiny model. Heads are 4 so that sequence-parallel degrees 2 and 4 divide them."""

    kind: str = "t2v"
    seed: int = 0
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    num_layers: int = 2
    ffn_dim: int = 64
    text_dim: int = 32
    vocab_size: int = 64


def build_tokenizer(vocab_size: int):
    """Trains a tiny T5-style sentencepiece unigram tokenizer in memory (no download).

    Piece ids follow T5: pad=0, eos=1, unk=2. Built from ``(piece, score)`` pairs because
    ``T5Tokenizer(vocab_file=...)`` silently yields a 4-token vocabulary in transformers 5.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    rng = random.Random(1234)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _text_encoder(spec: TinySpec, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=spec.text_dim, d_kv=8, d_ff=spec.text_dim * 2, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


#: Gains applied to the random weights. With default initialisation the text path of a tiny
#: transformer barely moves its output and a random VAE decoder shrinks latent differences
#: ~70x, so a wrong guidance scale or a wrong expert step would hide under a 1e-5 tolerance.
#: The decoder gain stays low enough that fp32 reordering noise (e.g. flash vs math SDPA)
#: moves the output by ~1e-5, well under the 1e-4 multi-process tolerance.
TEXT_GAIN = 10.0
DECODER_GAIN = 1.2


def _transformer(spec: TinySpec, in_channels: int, out_channels: int):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.num_attention_heads,
        attention_head_dim=spec.attention_head_dim, in_channels=in_channels,
        out_channels=out_channels, text_dim=spec.text_dim, freq_dim=32, ffn_dim=spec.ffn_dim,
        num_layers=spec.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    with torch.no_grad():
        model.condition_embedder.text_embedder.linear_2.weight.mul_(TEXT_GAIN)
        for block in model.blocks:
            block.attn2.to_out[0].weight.mul_(TEXT_GAIN)
    return model


def _vae(kind: str):
    vae = _vae_module(kind)
    with torch.no_grad():
        for param in vae.decoder.parameters():
            if param.dim() > 1:
                param.mul_(DECODER_GAIN)
    return vae


def _vae_module(kind: str):
    from diffusers import AutoencoderKLWan

    if kind == "ti2v":
        # The Wan 2.2 VAE: 48 latent channels, 16x spatial compression via a 2x2 patchify.
        z_dim = 48
        return AutoencoderKLWan(
            base_dim=12, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        ).eval()
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def _scheduler(shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=shift,
    )


def make_tiny(directory: str | Path, *, kind: str = "t2v", seed: int = 0) -> Path:
    """Writes a random tiny Wan 2.2 model of ``kind`` to ``directory`` in the diffusers layout.

    Args:
        directory: Target folder; created if missing. Existing component folders are replaced.
        kind: ``t2v`` (two experts, boundary 0.875), ``i2v`` (two experts with 36 input channels,
            boundary 0.9) or ``ti2v`` (one dense transformer, 48-channel VAE, per-token timesteps).
        seed: Seed for the random weights; the two experts get different weights.

    Returns:
        The directory, as a ``Path``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = TinySpec(kind=kind, seed=seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.vocab_size)
    vocab_size = len(tokenizer)
    text_encoder = _text_encoder(spec, vocab_size)
    vae = _vae(kind)
    z_dim = vae.config.z_dim
    defaults = TINY_DEFAULTS[kind]
    components = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae,
                  "scheduler": _scheduler(TINY_SHIFT)}
    if kind == "ti2v":
        components["transformer"] = _transformer(spec, z_dim, z_dim)
    else:
        in_channels = z_dim if kind == "t2v" else 2 * z_dim + 4  # I2V: noise + image latents + mask
        components["transformer"] = _transformer(spec, in_channels, z_dim)
        torch.manual_seed(seed + 1)  # the low-noise expert must differ from the high-noise one
        components["transformer_2"] = _transformer(spec, in_channels, z_dim)
    _save(out, kind, components)
    (out / "relay.json").write_text(json.dumps({"defaults": defaults, "tiny": True}, indent=2) + "\n")
    return out


def _save(out: Path, kind: str, components: dict) -> None:
    """Saves the components through diffusers itself so that the layout is the real one."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind == "i2v":
        pipe = WanImageToVideoPipeline(image_processor=None, image_encoder=None, boundary_ratio=0.9,
                                       **components)
    elif kind == "ti2v":
        pipe = WanPipeline(transformer_2=None, boundary_ratio=None, expand_timesteps=True, **components)
    else:
        pipe = WanPipeline(boundary_ratio=0.875, **components)
    pipe.save_pretrained(out, safe_serialization=True)


#: Module name suffixes a tiny LoRA trains (attention projections and the feed-forward layers,
#: as the released Wan LoRAs do).
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
LORA_LAYOUTS = ("diffusers", "wan", "kohya")


def write_lora(path: str | Path, model: str | Path, *, expert: str = "high_noise", layout: str = "diffusers",
               rank: int = 4, alpha: float | None = None, seed: int = 0, gain: float = 0.3,
               bias: bool = False, norm_deltas: bool = False, targets: tuple[str, ...] = LORA_TARGETS) -> Path:
    """Writes a random LoRA for one expert of the model folder ``model`` to ``path``.

    Args:
        path: The ``.safetensors`` file to write.
        model: A Wan model folder (its expert's config gives the layer shapes).
        expert: ``high_noise``, ``low_noise`` or ``dense``.
        layout: ``diffusers`` (PEFT keys; ``alpha`` goes to the adapter metadata), ``wan`` (the
            original / ComfyUI keys with ``alpha`` tensors) or ``kohya`` (``lora_unet_`` keys).
        rank: LoRA rank.
        alpha: LoRA alpha (``None``: no alpha, i.e. a scale of 1).
        seed: Seed of the random factors.
        gain: Size of the update relative to a unit-variance layer (visible in the output).
        bias: Also write bias deltas (``lora_B.bias`` / ``diff_b``), as distill LoRAs carry.
        norm_deltas: Also write norm-scale deltas (``diff`` of the norms; ``wan`` layout only).
        targets: Module name suffixes inside each block that get factors.
    """
    from safetensors.torch import save_file

    from relay.engine.lora import module_table
    from relay.engine.model_info import read_model_info
    from relay.engine.models.wan.lora import _BLOCK_NAMES

    if layout not in LORA_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LORA_LAYOUTS)}, got {layout!r}")
    if norm_deltas and layout != "wan":
        raise ValueError("norm deltas exist in the wan layout only")
    table = module_table(read_model_info(model), expert)
    original = {v: k for k, v in _BLOCK_NAMES.items()}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    blocks = sorted({int(name.split(".")[1]) for name in table if name.startswith("blocks.")})

    def randn(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    for block in blocks:
        for suffix in targets:
            name = f"blocks.{block}.{suffix}"
            out_features, in_features = table[name].weight
            down = randn(rank, in_features, std=1.0 / in_features ** 0.5)
            up = randn(out_features, rank, std=gain / rank ** 0.5)
            delta_bias = randn(out_features, std=gain * 0.1) if bias else None
            if layout == "diffusers":
                tensors[f"transformer.{name}.lora_A.weight"] = down
                tensors[f"transformer.{name}.lora_B.weight"] = up
                if delta_bias is not None:
                    tensors[f"transformer.{name}.lora_B.bias"] = delta_bias
                continue
            stem = f"blocks.{block}.{original[suffix]}"
            key = f"diffusion_model.{stem}" if layout == "wan" else "lora_unet_" + stem.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            if delta_bias is not None:
                tensors[f"{key}.diff_b"] = delta_bias
        if norm_deltas:
            for suffix in ("attn1.norm_q", "attn2.norm_k", "norm2"):
                shape = table[f"blocks.{block}.{suffix}"].weight
                tensors[f"diffusion_model.blocks.{block}.{original[suffix]}.diff"] = randn(*shape, std=gain)
    metadata = None
    if layout == "diffusers":
        config = {"r": rank, "lora_alpha": alpha if alpha is not None else rank,
                  "target_modules": sorted(set(targets)), "lora_bias": bias}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return out
