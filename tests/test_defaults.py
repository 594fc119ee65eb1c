"""Defaults respect the model folder, as diffusers does: with no flags beyond prompt, seed, size,
frames, steps and guidance, ``relay generate`` equals ``WanPipeline.from_pretrained(dir)`` called
with the same arguments -- on tiny folders whose scheduler ``flow_shift`` (3.0) is none of the
Wan 2.2 table's values (12 / 5), so a default that ignored the folder would show. ``relay.json``
in the folder overrides the folder's configs."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

PROMPT = "a lighthouse at dusk, waves below"
CALL = dict(height=32, width=32, frames=5, steps=6, seed=4, guidance=4.5)
TOLERANCE = 1e-5


def _pipeline(kind: str, folder, shift: float | None = None):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if kind == "i2v" else WanPipeline
    pipe = cls.from_pretrained(folder)
    if shift is not None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(kind: str, folder, image: bytes | None, shift: float | None = None) -> np.ndarray:
    """diffusers' own pipeline with the same call arguments (nothing else set)."""
    from PIL import Image

    kwargs = dict(prompt=PROMPT, height=CALL["height"], width=CALL["width"], num_frames=CALL["frames"],
                  num_inference_steps=CALL["steps"], guidance_scale=CALL["guidance"],
                  generator=torch.Generator().manual_seed(CALL["seed"]), output_type="np")
    if image is not None:
        kwargs["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    return _pipeline(kind, folder, shift)(**kwargs).frames[0]


def _relay(relay, folder, image_path, out) -> str:
    args = ["generate", "--model", folder, "--prompt", PROMPT, "--dtype", "fp32", "--device", "cpu",
            "--output", out, "--height", CALL["height"], "--width", CALL["width"], "--frames", CALL["frames"],
            "--steps", CALL["steps"], "--seed", CALL["seed"], "--guidance", CALL["guidance"]]
    if image_path is not None:
        args += ["--image", image_path]
    result = relay(*args)
    assert result.code == 0, result.err
    return result.err


def test_the_tiny_folders_shift_is_not_a_table_value(tiny_models):
    from relay.engine.models.wan.config import PRESETS

    for kind, folder in tiny_models.items():
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert config["flow_shift"] not in (PRESETS[kind].shift, 12.0, 5.0), kind
        assert "shift" not in json.loads((folder / "relay.json").read_text())["defaults"]


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_unset_settings_equal_wan_pipeline_from_pretrained(kind, tiny_models, png_bytes, relay, tmp_path):
    folder = tiny_models[kind]
    image_path = None
    if kind == "i2v":
        image_path = tmp_path / "first.png"
        image_path.write_bytes(png_bytes)
    out = tmp_path / "x.npy"
    err = _relay(relay, folder, image_path, out)
    ours = np.load(out)
    reference = _diffusers(kind, folder, png_bytes if kind == "i2v" else None)
    assert ours.shape == reference.shape and ours.std() > 1e-3
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)
    # The settings are printed with their sources.
    assert "shift         3.0        scheduler/scheduler_config.json" in err
    if kind != "ti2v":
        assert "boundary" in err and "model_index.json" in err
        assert "guidance (as diffusers' guidance_scale_2)" in err
    assert "steps         6          --steps" in err


def test_relay_json_overrides_the_folder(tiny_models, relay, tmp_path):
    folder = tmp_path / "t2v"
    shutil.copytree(tiny_models["t2v"], folder)
    house = json.loads((folder / "relay.json").read_text())
    house["defaults"]["shift"] = 7.0
    (folder / "relay.json").write_text(json.dumps(house))
    out = tmp_path / "x.npy"
    err = _relay(relay, folder, None, out)
    assert "shift         7.0        relay.json" in err
    np.testing.assert_allclose(np.load(out), _diffusers("t2v", folder, None, shift=7.0), atol=TOLERANCE, rtol=0)
    # ... and differs from the folder's own shift: the override is not a no-op.
    assert np.abs(np.load(out) - _diffusers("t2v", tiny_models["t2v"], None)).max() > 1e-3


def test_unknown_relay_json_default_is_a_model_error(tiny_models, tmp_path):
    from relay.engine.errors import ModelError
    from relay.engine.model_info import read_model_info

    folder = tmp_path / "t2v"
    shutil.copytree(tiny_models["t2v"], folder)
    (folder / "relay.json").write_text(json.dumps({"defaults": {"stepz": 3}}))
    with pytest.raises(ModelError, match="stepz"):
        read_model_info(folder)
