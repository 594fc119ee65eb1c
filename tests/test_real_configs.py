"""Real Wan 2.2 layouts (configs only, no weights): kind detection, size rules and the
full-size architectures built on the meta device with the real diffusers classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

A14B = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
            rope_max_seq_len=1024)
TI2V_5B = dict(A14B, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
               out_channels=48)
VAE21 = dict(base_dim=96, z_dim=16, scale_factor_spatial=8, scale_factor_temporal=4)
VAE22 = dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
             scale_factor_spatial=16, scale_factor_temporal=4)
UNIPC = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
         "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}

LAYOUTS = {
    "t2v": ({"_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": False},
            [("transformer", A14B), ("transformer_2", A14B)], VAE21),
    "i2v": ({"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9},
            [("transformer", dict(A14B, in_channels=36)), ("transformer_2", dict(A14B, in_channels=36))],
            VAE21),
    "ti2v": ({"_class_name": "WanPipeline", "boundary_ratio": None, "expand_timesteps": True},
             [("transformer", TI2V_5B)], VAE22),
}


def _write(root: Path, kind: str) -> Path:
    index, transformers, vae = LAYOUTS[kind]
    index = dict(index)
    for name in ("transformer", "transformer_2"):
        index[name] = ["diffusers", "WanTransformer3DModel"] if any(n == name for n, _ in transformers) else [None, None]
    for name, conf in transformers:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(dict(conf, _class_name="WanTransformer3DModel")))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(dict(vae, _class_name="AutoencoderKLWan")))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(UNIPC))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("kind,multiple,heads", [("t2v", 16, 40), ("i2v", 16, 40), ("ti2v", 32, 24)])
def test_real_layouts_are_classified(kind, multiple, heads, tmp_path):
    from relay.engine.model_info import read_model_info
    from relay.engine.models.wan.config import PRESETS
    from relay.engine.request import GenerationRequest, resolve_request

    info = read_model_info(_write(tmp_path / kind, kind))
    assert info.kind == kind and not info.tiny
    assert info.spatial_multiple == multiple and info.num_attention_heads == heads
    # The folder's own scheduler config sets the shift (as diffusers reads it); the table the rest.
    from dataclasses import replace

    assert info.defaults == replace(PRESETS[kind], shift=UNIPC["flow_shift"])
    assert info.default_sources["shift"] == "scheduler/scheduler_config.json"
    assert info.default_sources["steps"] == f"Wan 2.2 reference ({kind})"
    image = None
    if kind == "i2v":
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (832, 480)).save(buffer, "PNG")
        image = buffer.getvalue()
    resolved = resolve_request(GenerationRequest(prompt="x", image=image), info)
    if kind == "i2v":  # 832x480 image: aspect kept at the 1280x720 area
        assert (resolved.width, resolved.height) == (1264, 720)
    else:
        assert (resolved.width, resolved.height) == (1280, PRESETS[kind].height)


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch):
    """A hub id is looked up in HF_HOME's cache; nothing is downloaded."""
    from relay.engine.errors import ModelError
    from relay.engine.model_info import read_model_info

    cache = tmp_path / "hf" / "hub" / "models--Wan-AI--Wan2.2-T2V-A14B-Diffusers"
    _write(cache / "snapshots" / "abc123", "t2v")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    info = read_model_info("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert info.kind == "t2v" and info.path.name == "abc123"
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        read_model_info("Wan-AI/Not-There")


@pytest.mark.parametrize("conf,billions", [(A14B, 14.3), (TI2V_5B, 5.0)])
def test_full_size_architectures_build_on_meta(conf, billions):
    """The full-size configs build with the real diffusers class (meta device, no memory)."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**{k: (tuple(v) if k == "patch_size" else v) for k, v in conf.items()})
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(params - billions) / billions < 0.05, params


def test_flop_count_matches_the_wan22_reference_figures():
    """One A14B expert forward at 720p x 81 frames is about 6.5 PFLOP, ~72% self-attention."""
    from relay.engine.models.wan.flops import transformer_flops, video_tokens

    tokens = video_tokens(A14B, height=720, width=1280, frames=81)
    assert tokens == 75_600
    assert video_tokens(A14B, height=480, width=832, frames=81) == 32_760
    flops = transformer_flops(A14B, tokens)
    assert abs(flops["total"] / 6.5e15 - 1) < 0.02
    assert abs(flops["self_attention"] / flops["total"] - 0.72) < 0.01


def test_out_of_memory_advice_prices_the_layout_and_what_fits(tmp_path):
    """A full-size A14B folder matches the catalog: the advice gives the planner's peak for the
    layout that failed and layouts that fit the GPU it failed on (an 80 GB card: the H100)."""
    from relay.engine.errors import OutOfMemory
    from relay.launch.memory import catalog_model, request_advice
    from relay.engine.model_info import read_model_info

    folder = _write(tmp_path / "t2v", "t2v")
    assert catalog_model(read_model_info(folder)).name == "t2v-a14b"
    request = {"width": 1280, "height": 720, "frames": 81, "steps": 40}
    group = {"roles": ["encode", "high_noise", "low_noise", "decode"], "ranks": 1,
             "layout": "cfg=1,ulysses=1,ring=1,fsdp=1"}
    oom = OutOfMemory(0, "cuda:0", "advance", "CUDA out of memory.", 79 * 10**9, 80 * 10**9)
    advice = request_advice(str(folder), request, group, oom)
    assert "The planner puts this layout at" in advice and "h100" in advice.lower()
    peak = float(advice.split("at ", 1)[1].split(" GiB")[0])
    assert peak > 72  # two bf16 14B experts alone are 53 GiB, plus the text encoder and work
    assert "What fits:" in advice and "--offload (" in advice and "ranks as" in advice
    assert "relay plan --gpu" in advice and "--size 1280x720 --frames 81" in advice
    # On the host (or a model the catalog does not know) the general advice, said as such.
    host = OutOfMemory(0, "cpu", "advance", "DefaultCPUAllocator: can't allocate memory")
    assert "No planner figures: this rank ran on the host" in request_advice(str(folder), request, group, host)
