"""Every validation rule: exit code 2, a message naming the flag, and no weights touched.

The CLI runs against copies of the tiny models with every weight file deleted: if any rule
were checked after loading weights, the run would fail with a load error instead.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def configs_only(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("configs-only")
    out = {}
    for kind, path in tiny_models.items():
        copy = root / kind
        shutil.copytree(path, copy)
        for weights in copy.rglob("*.safetensors"):
            weights.unlink()
        out[kind] = copy
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")

    def png(name, size, mode="RGB"):
        path = folder / name
        Image.new(mode, size).save(path, "PNG")
        return path

    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    (folder / "huge.bin").write_bytes(b"\0" * (33 * 1024 * 1024))
    (folder / "empty.png").write_bytes(b"")
    return {
        "ok": png("ok.png", (64, 48)),
        "bomb": png("bomb.png", (8000, 6000), mode="1"),  # 48 MP, a few KB on disk
        "tiny": png("tiny.png", (8, 8)),
        "corrupt": folder / "corrupt.png",
        "huge": folder / "huge.bin",
        "empty": folder / "empty.png",
        "missing": folder / "does-not-exist.png",
    }


LONG_PROMPT = " ".join(["astronaut"] * 600)

# (case id, model kind, extra flags, flag named in the message, words in the message)
CASES = [
    ("height-not-multiple", "t2v", ["--height", "40"], "--height", "multiple of 16"),
    ("width-not-multiple", "t2v", ["--width", "50"], "--width", "multiple of 16"),
    ("ti2v-multiple-32", "ti2v", ["--height", "48"], "--height", "multiple of 32"),
    ("height-zero", "t2v", ["--height", "0"], "--height", "between"),
    ("height-negative", "t2v", ["--height", "-16"], "--height", "between"),
    ("width-huge", "t2v", ["--width", "65536"], "--width", "between"),
    ("frames-not-4k1", "t2v", ["--frames", "8"], "--frames", "4k+1"),
    ("frames-zero", "t2v", ["--frames", "0"], "--frames", "between"),
    ("frames-huge", "t2v", ["--frames", "100001"], "--frames", "between"),
    ("steps-zero", "t2v", ["--steps", "0"], "--steps", "between"),
    ("steps-too-many", "t2v", ["--steps", "1001"], "--steps", "between"),
    ("guidance-nan", "t2v", ["--guidance", "nan"], "--guidance", "finite"),
    ("guidance-inf", "t2v", ["--guidance", "inf"], "--guidance", "finite"),
    ("guidance-below-one", "t2v", ["--guidance", "0.5"], "--guidance", "in [1.0"),
    ("guidance-too-high", "t2v", ["--guidance", "25"], "--guidance", "in [1.0"),
    ("guidance-low-nan", "t2v", ["--guidance-low", "nan"], "--guidance-low", "finite"),
    ("guidance-low-on-dense", "ti2v", ["--guidance-low", "3"], "--guidance-low", "single transformer"),
    ("shift-zero", "t2v", ["--shift", "0"], "--shift", "(0.0"),
    ("shift-nan", "t2v", ["--shift", "nan"], "--shift", "finite"),
    ("boundary-one", "t2v", ["--boundary", "1.0"], "--boundary", "below 1.0"),
    ("boundary-zero", "t2v", ["--boundary", "0"], "--boundary", "(0.0"),
    ("boundary-on-dense", "ti2v", ["--boundary", "0.5"], "--boundary", "single transformer"),
    ("fps-zero", "t2v", ["--fps", "0"], "--fps", "between"),
    ("fps-huge", "t2v", ["--fps", "1000"], "--fps", "between"),
    ("seed-negative", "t2v", ["--seed", "-2"], "--seed", "between"),
    ("seed-too-large", "t2v", ["--seed", str(2**63)], "--seed", "between"),
    ("prompt-empty", "t2v", ["--prompt", ""], "--prompt", "non-empty"),
    ("prompt-blank", "t2v", ["--prompt", "   "], "--prompt", "non-empty"),
    ("prompt-too-long", "t2v", ["--prompt", LONG_PROMPT], "--prompt", "limit is 512"),
    ("negative-too-long", "t2v", ["--negative-prompt", LONG_PROMPT], "--negative-prompt", "limit is 512"),
    ("image-on-t2v", "t2v", ["--image", "@ok"], "--image", "takes no image"),
    ("image-missing-i2v", "i2v", [], "--image", "needs an input image"),
    ("image-unreadable", "i2v", ["--image", "@missing"], "--image", "cannot read"),
    ("image-corrupt", "i2v", ["--image", "@corrupt"], "--image", "cannot be decoded"),
    ("image-empty", "i2v", ["--image", "@empty"], "--image", "empty"),
    ("image-too-many-bytes", "i2v", ["--image", "@huge"], "--image", "bytes"),
    ("image-bomb", "i2v", ["--image", "@bomb"], "--image", "pixels"),
    ("image-too-small", "i2v", ["--image", "@tiny"], "--image", "each side"),
    ("output-suffix", "t2v", ["--output", "@out.avi"], "--output", ".mp4 or .npy"),
    ("checkpoint-range", "t2v", ["--checkpoint-dir", "@ck", "--checkpoint-at", "99"], "--checkpoint-at", "1.."),
    ("checkpoint-needs-dir", "t2v", ["--checkpoint-at", "2"], "--checkpoint-dir", "required"),
    ("model-missing", None, [], "--model", "does not exist"),
]


@pytest.mark.parametrize("case,kind,extra,flag,words", CASES, ids=[c[0] for c in CASES])
def test_rule_exits_2_naming_the_field(case, kind, extra, flag, words, configs_only, images,
                                       relay, tmp_path):
    model = configs_only[kind] if kind else tmp_path / "no-such-model"
    args = {"--model": str(model), "--prompt": "a quiet street", "--output": str(tmp_path / "x.npy")}
    rest = []
    for i in range(0, len(extra), 2):
        key, value = extra[i], extra[i + 1]
        if value.startswith("@"):
            name = value[1:]
            value = str(images[name]) if name in images else str(tmp_path / name)
        if key in args:
            args[key] = value
        else:
            rest += [key, value]
    argv = ["generate"] + [x for kv in args.items() for x in kv] + rest
    result = relay(*argv)
    assert result.code == 2, result.err
    assert f"error: {flag}:" in result.err, result.err
    assert words in result.err, result.err
    assert not (tmp_path / "x.npy").exists()


def test_argparse_type_errors_exit_2(relay, tmp_path):
    result = relay("generate", "--prompt", "x", "--height", "abc", "--output", tmp_path / "x.npy")
    assert result.code == 2 and "--height" in result.err


def test_valid_request_passes_validation_then_needs_weights(configs_only, relay, tmp_path):
    """Control: with valid flags the configs-only model gets past validation and fails only
    where weights are needed -- so the cases above really are refused before any weights."""
    result = relay("generate", "--model", configs_only["t2v"], "--prompt", "a quiet street",
                   "--output", tmp_path / "x.npy", "--quiet")
    assert result.code == 2
    assert "--model:" in result.err and "cannot load the text encoder" in result.err


def test_i2v_size_follows_image_aspect(tiny_models, png_bytes):
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request

    info = read_model_info(tiny_models["i2v"])
    resolved = resolve_request(GenerationRequest(prompt="x", image=png_bytes), info)
    # 56x40 image, default area 64x64: aspect kept, rounded down onto the 16-pixel grid.
    assert (resolved.width, resolved.height) == (64, 48)
    assert resolved.width % info.spatial_multiple == 0 and resolved.height % info.spatial_multiple == 0


def test_defaults_come_from_kind_preset_and_relay_json(tiny_models):
    from relay.engine.model_info import read_model_info
    from relay.engine.models.wan.config import PRESETS
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.models.wan.tiny import TINY_DEFAULTS

    info = read_model_info(tiny_models["t2v"])
    resolved = resolve_request(GenerationRequest(prompt="x"), info)
    assert resolved.steps == TINY_DEFAULTS["t2v"]["steps"]
    assert resolved.guidance == PRESETS["t2v"].guidance
    assert resolved.guidance_low == PRESETS["t2v"].guidance_low
    assert resolved.boundary == 0.875
    assert 0 <= resolved.seed < 2**63


# --- the limits themselves, on both sides of the edge -------------------------------------------
@pytest.mark.parametrize("field, ok, refused", [
    ("height", 2048, 2064),   # the largest multiple of 16 allowed, and the next one
    ("width", 2048, 2064),
    ("frames", 257, 261),     # 4k+1 up to 257
    ("fps", 120, 121),
    ("guidance", 20.0, 20.01),
    ("guidance_low", 20.0, 20.01),
    ("steps", 1000, 1001),
    ("seed", 2**63 - 1, 2**63),
    ("shift", 100.0, 100.01),
])
def test_limits_at_the_edge(field, ok, refused, tiny_models):
    from relay.engine.errors import ValidationError
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request

    info = read_model_info(tiny_models["t2v"])
    resolved = resolve_request(GenerationRequest(prompt="x", **{field: ok}), info)
    assert getattr(resolved, field) == ok
    with pytest.raises(ValidationError) as caught:
        resolve_request(GenerationRequest(prompt="x", **{field: refused}), info)
    assert caught.value.field == field
