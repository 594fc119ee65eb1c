"""An LTX-2 diffusers folder read from its JSON configs alone (no weights are opened).

One LTX-2 checkpoint does text-to-video and image-to-video (``LTX2Pipeline`` and
``LTX2ImageToVideoPipeline`` load the same components), so Relay treats every LTX-2 folder as
kind ``ti2v``: text, and an optional first image. The video VAE fixes the size multiple (32) and
the frame rule (``8k + 1``); the audio VAE and the vocoder fix the sound track (the tokens per
second of the audio stream, the output sample rate). Defaults are diffusers' ``LTX2Pipeline``
defaults (768x512, 121 frames at 24 fps, 30 steps, guidance 3), which a ``relay.json`` in the
folder may override, as for Wan.
"""

from __future__ import annotations

import math
from pathlib import Path

from relay.engine.errors import ModelError
from relay.engine.model_info import Defaults, ModelInfo
from relay.engine.models.wan.config import RELAY_JSON, read_json

FAMILY = "ltx2"
PIPELINE_CLASSES = ("LTX2Pipeline", "LTX2ImageToVideoPipeline")
KINDS = ("ti2v",)
#: The components every LTX-2 folder has.
COMPONENTS = ("transformer", "vae", "audio_vae", "vocoder", "text_encoder", "tokenizer", "connectors", "scheduler")

def dynamic_shift(video_tokens: int, scheduler_config: dict) -> float:
    """The flow shift LTX-2 uses for ``video_tokens`` latent tokens: ``exp(mu)`` with ``mu``
    linear in the token count between the scheduler's base and max sequence lengths (the
    pipeline's ``calculate_shift``), which is what its exponential time shift applies."""
    base_len = scheduler_config.get("base_image_seq_len", 1024)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.95)
    max_shift = scheduler_config.get("max_shift", 2.05)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = video_tokens * slope + (base_shift - slope * base_len)
    return math.exp(mu)


#: diffusers' ``LTX2Pipeline.__call__`` defaults. ``shift`` here is the resolution-dependent
#: flow shift at this size (6,144 video tokens; :func:`dynamic_shift`); a request's own size
#: gets its own.
PRESETS: dict[str, Defaults] = {
    "ti2v": Defaults(height=512, width=768, frames=121, steps=30, shift=dynamic_shift(16 * 16 * 24, {}),
                     boundary=None, guidance=3.0, guidance_low=None, fps=24),
}
REFERENCE = "LTX-2 reference (diffusers LTX2Pipeline defaults)"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def _vae_ratios(vconf: dict) -> tuple[int, int]:
    scaling = vconf.get("spatio_temporal_scaling", (True, True, True, True))
    if isinstance(scaling, bool):
        scaling = (scaling,) * (len(vconf.get("layers_per_block", (4, 6, 6, 2, 2))) - 1)
    spatial = vconf.get("spatial_compression_ratio") or int(vconf.get("patch_size", 4)) * 2 ** sum(scaling)
    temporal = vconf.get("temporal_compression_ratio") or int(vconf.get("patch_size_t", 1)) * 2 ** sum(scaling)
    return int(spatial), int(temporal)


def read_info(path: Path, index: dict) -> ModelInfo:
    """Reads an LTX-2 folder (kind ``ti2v``) and resolves its defaults.

    Raises:
        ModelError: a component is missing or the configs do not fit together.
    """
    missing = [name for name in COMPONENTS if not isinstance(index.get(name), list) or index[name][0] is None]
    if missing:
        raise ModelError(f"{path}/model_index.json lacks the LTX-2 component(s) {', '.join(missing)}")
    tconf = read_json(path / "transformer" / "config.json")
    vconf = read_json(path / "vae" / "config.json")
    aconf = read_json(path / "audio_vae" / "config.json")
    oconf = read_json(path / "vocoder" / "config.json")
    sconf = read_json(path / SCHEDULER_CONFIG)
    spatial, temporal = _vae_ratios(vconf)
    patch, patch_t = int(tconf.get("patch_size", 1)), int(tconf.get("patch_size_t", 1))
    latent = int(vconf.get("latent_channels", 128))
    in_channels = int(tconf.get("in_channels", 128))
    if in_channels != latent * patch * patch * patch_t:
        raise ModelError(f"{path}: transformer in_channels={in_channels} does not fit the VAE's {latent} latent "
                         f"channels with patch {patch}x{patch}x{patch_t}")
    heads = int(tconf.get("num_attention_heads", 32))
    audio_heads = int(tconf.get("audio_num_attention_heads", 32))
    if heads != audio_heads:
        raise ModelError(f"{path}: video ({heads}) and audio ({audio_heads}) attention heads differ")
    extra = read_json(path / RELAY_JSON) if (path / RELAY_JSON).exists() else {}
    values, sources = _defaults(sconf, extra, spatial=spatial, temporal=temporal, patch=patch, patch_t=patch_t)
    return ModelInfo(
        path=path, family=FAMILY, kind="ti2v", experts=("transformer",), boundary_ratio=None,
        expand_timesteps=False, spatial_multiple=spatial * patch, vae_spatial=spatial,
        temporal_stride=temporal * patch_t, patch_size=(patch_t, patch, patch), z_dim=latent,
        in_channels=in_channels, num_attention_heads=heads,
        num_train_timesteps=int(sconf.get("num_train_timesteps", 1000)),
        scheduler_class=str(sconf.get("_class_name", "FlowMatchEulerDiscreteScheduler")),
        image_dim=None, tiny=bool(extra.get("tiny", False)), defaults=values, default_sources=sources,
        transformer_config=tconf, has_audio=True,
        audio_sample_rate=int(oconf.get("output_sampling_rate", aconf.get("sample_rate", 16000))),
    )


def scheduler_config(info) -> dict:
    """The folder's scheduler config (for the resolution-dependent shift)."""
    return read_json(info.path / SCHEDULER_CONFIG)


def video_tokens(height: int, width: int, frames: int, *, spatial: int, temporal: int, patch: int = 1,
                 patch_t: int = 1) -> int:
    """Latent tokens of the video stream (``F' x H' x W'`` after the VAE and the patch)."""
    latent_frames = (frames - 1) // temporal + 1
    return (latent_frames // patch_t) * (height // spatial // patch) * (width // spatial // patch)


def _defaults(sconf: dict, extra: dict, *, spatial: int, temporal: int, patch: int,
              patch_t: int) -> tuple[Defaults, dict[str, str]]:
    values = dict(PRESETS["ti2v"].__dict__)
    sources = {name: REFERENCE for name in values}
    sources.pop("guidance_low")
    sources.pop("boundary")
    house = extra.get("defaults", {})
    unknown = set(house) - (set(values) - {"boundary", "guidance_low"})
    if unknown:
        raise ModelError(f"{RELAY_JSON}: unknown default(s) {sorted(unknown)}; known: "
                         f"{', '.join(n for n in values if n not in ('boundary', 'guidance_low'))}")
    for name, value in house.items():
        values[name] = value
        sources[name] = RELAY_JSON
    if "shift" not in house:
        tokens = video_tokens(values["height"], values["width"], values["frames"], spatial=spatial,
                              temporal=temporal, patch=patch, patch_t=patch_t)
        values["shift"] = dynamic_shift(tokens, sconf)
        sources["shift"] = f"{SCHEDULER_CONFIG} (resolution-dependent)"
    return Defaults(**values), sources
