"""Parity: ``relay generate --output x.npy`` equals diffusers' own pipelines, fp32 on CPU.

The reference is diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` loaded from the same
directory with ``from_pretrained`` and run with the same seed and settings; Relay's engine is
written independently (it calls no pipeline ``__call__``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPT = "a cat walking in the rain, cinematic"
NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-5


def _reference(model_dir, *, kind, image, height, width, frames, steps, seed, guidance,
               guidance_low, shift):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from PIL import Image
    import io

    if kind == "ti2v" and image is not None:
        # TI2V-5B's image mode is the image-to-video pipeline with per-token timesteps.
        base = WanPipeline.from_pretrained(model_dir)
        pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                                       vae=base.vae, scheduler=base.scheduler,
                                       transformer=base.transformer, expand_timesteps=True)
    elif kind == "i2v":
        pipe = WanImageToVideoPipeline.from_pretrained(model_dir)
    else:
        pipe = WanPipeline.from_pretrained(model_dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                  num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    if guidance_low is not None:
        kwargs["guidance_scale_2"] = guidance_low
    if image is not None:
        kwargs["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    return pipe(**kwargs).frames[0]


CASES = {
    # T2V: 6 steps at shift 5 run 3 high-noise then 3 low-noise steps (boundary 0.875).
    "t2v": dict(kind="t2v", image=False, height=32, width=48, frames=9, steps=6, seed=7,
                guidance=4.0, guidance_low=3.0, shift=5.0),
    "i2v": dict(kind="i2v", image=True, height=48, width=32, frames=9, steps=6, seed=11,
                guidance=3.5, guidance_low=2.0, shift=5.0),
    "ti2v": dict(kind="ti2v", image=False, height=64, width=96, frames=9, steps=5, seed=3,
                 guidance=5.0, guidance_low=None, shift=5.0),
    "ti2v-image": dict(kind="ti2v", image=True, height=64, width=64, frames=5, steps=4, seed=5,
                       guidance=5.0, guidance_low=None, shift=5.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_output_equals_diffusers_pipeline(case, tiny_models, png_bytes, relay, tmp_path):
    c = dict(CASES[case])
    model_dir = tiny_models[c["kind"]]
    image = png_bytes if c.pop("image") else None
    out = tmp_path / "x.npy"
    args = ["generate", "--model", model_dir, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--height", c["height"], "--width", c["width"], "--frames", c["frames"],
            "--steps", c["steps"], "--seed", c["seed"], "--guidance", c["guidance"],
            "--shift", c["shift"], "--dtype", "fp32", "--device", "cpu", "--output", out, "--quiet"]
    if c["guidance_low"] is not None:
        args += ["--guidance-low", c["guidance_low"]]
    if image is not None:
        path = tmp_path / "first.png"
        path.write_bytes(image)
        args += ["--image", path]
    result = relay(*args)
    assert result.code == 0, result.err
    ours = np.load(out)
    reference = _reference(model_dir, image=image, **c)
    assert ours.dtype == np.float32 and ours.shape == (c["frames"], c["height"], c["width"], 3)
    assert ours.shape == reference.shape
    assert 0.0 <= ours.min() and ours.max() <= 1.0
    assert ours.std() > 1e-3, "degenerate output would make the comparison meaningless"
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_t2v_parity_case_crosses_the_expert_boundary(tiny_models):
    """The T2V parity case must exercise both experts, or it would not test the switch."""
    from relay.engine.model_info import read_model_info

    info = read_model_info(tiny_models["t2v"])
    experts = info.spec.expert_schedule(info, CASES["t2v"]["steps"], CASES["t2v"]["shift"], info.boundary_ratio)
    assert experts == ["high_noise"] * 3 + ["low_noise"] * 3


def test_experts_have_different_weights(tiny_models):
    """If both experts were equal, a wrong switch step would go unnoticed by parity tests."""
    from safetensors.torch import load_file

    for kind in ("t2v", "i2v"):
        high = load_file(next((tiny_models[kind] / "transformer").glob("*.safetensors")))
        low = load_file(next((tiny_models[kind] / "transformer_2").glob("*.safetensors")))
        assert high.keys() == low.keys()
        assert any(not torch.equal(high[k], low[k]) for k in high)
