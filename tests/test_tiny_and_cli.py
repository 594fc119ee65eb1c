"""The tiny default model, the installed ``relay`` console script end to end, and mp4 output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _relay_executable() -> list[str]:
    script = Path(sys.executable).with_name("relay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay.cli"]


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_make_tiny_writes_the_diffusers_layout(kind, tiny_models):
    path = tiny_models[kind]
    index = json.loads((path / "model_index.json").read_text())
    for component in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler"):
        assert (path / component).is_dir(), component
        assert index[component][0] is not None
    assert list((path / "transformer").glob("*.safetensors"))
    if kind == "ti2v":
        assert index["expand_timesteps"] is True and index["transformer_2"] == [None, None]
        assert json.loads((path / "vae" / "config.json").read_text())["z_dim"] == 48
    else:
        assert list((path / "transformer_2").glob("*.safetensors"))
        assert index["boundary_ratio"] == (0.875 if kind == "t2v" else 0.9)
    channels = json.loads((path / "transformer" / "config.json").read_text())["in_channels"]
    assert channels == {"t2v": 16, "i2v": 36, "ti2v": 48}[kind]


def test_model_info_classifies_each_kind(tiny_models):
    from relay.engine.model_info import read_model_info

    for kind, path in tiny_models.items():
        info = read_model_info(path)
        assert info.kind == kind and info.tiny
        assert info.spatial_multiple == (32 if kind == "ti2v" else 16)
        assert info.is_moe == (kind != "ti2v")


def test_tokenizer_round_trips_offline(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["t2v"] / "tokenizer")
    ids = tokenizer("a cat walking in the rain").input_ids
    assert len(tokenizer) > 32 and ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0


def test_relay_console_script_end_to_end(tmp_path):
    """`relay make-tiny` then `relay generate` without --model (the embedded default, built
    into RELAY_CACHE), writing an mp4 with the right frame count and fps."""
    from relay.engine.tiny import TINY_VERSION

    env = dict(os.environ, RELAY_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    out = tmp_path / "video.mp4"
    proc = subprocess.run(
        [*_relay_executable(), "generate", "--prompt", "a red kite over the sea", "--seed", "1",
         "--fps", "12", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "denoise" in proc.stderr and "seed 1" in proc.stderr  # progress bar and settings shown
    assert (tmp_path / "cache" / f"tiny-wan2.2-t2v-v{TINY_VERSION}" / "model_index.json").exists()
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(out))
    meta = reader.__next__()
    frames = list(reader)
    assert meta["fps"] == 12 and meta["size"] == (64, 64)
    assert len(frames) == 9


def test_mp4_and_npy_writers(tmp_path):
    import imageio_ffmpeg

    from relay.engine.video import write_output

    frames = np.linspace(0, 1, 5 * 32 * 48 * 3, dtype=np.float32).reshape(5, 32, 48, 3)
    npy = write_output(frames, tmp_path / "a.npy", fps=16)
    assert np.array_equal(np.load(npy), frames)
    mp4 = write_output(frames, tmp_path / "a.mp4", fps=16)
    reader = imageio_ffmpeg.read_frames(str(mp4))
    meta = next(reader)
    assert meta["fps"] == 16 and meta["size"] == (48, 32) and len(list(reader)) == 5
    with pytest.raises(ValueError):
        write_output(frames, tmp_path / "a.gif", fps=16)


def test_expert_split_matches_wan22_reference_numbers(tiny_models):
    """At the release settings the boundary gives T2V 26 high + 14 low steps (40 steps, shift
    12, boundary 0.875) and I2V 15 + 25 (shift 5, boundary 0.9), as the Wan 2.2 notes state."""
    from relay.engine.model_info import read_model_info

    info = read_model_info(tiny_models["t2v"])
    for shift, boundary, high in ((12.0, 0.875, 26), (5.0, 0.9, 15)):
        experts = info.spec.expert_schedule(info, 40, shift, boundary)
        assert experts.count("high_noise") == high and experts.count("low_noise") == 40 - high
        assert experts == sorted(experts)  # all high-noise steps come first


def test_relay_make_tiny_command_writes_a_loadable_model(relay, tmp_path):
    from relay.engine.model_info import read_model_info

    result = relay("make-tiny", tmp_path / "i2v", "--kind", "i2v", "--seed", "3")
    assert result.code == 0, result.err
    assert Path(result.out.strip()) == tmp_path / "i2v"
    info = read_model_info(tmp_path / "i2v")
    assert info.kind == "i2v" and info.tiny and info.is_moe
    bad = relay("make-tiny", tmp_path / "x", "--kind", "t2i")
    assert bad.code == 2 and "--kind" in bad.err


def test_relay_demo_the_readmes_main_job(tmp_path):
    """`relay demo` (what `make demo` runs): a server on the embedded tiny model, a submission
    with streamed previews, the video written, the server drained."""
    import imageio_ffmpeg

    env = dict(os.environ, RELAY_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out" / "demo.mp4"
    proc = subprocess.run([*_relay_executable(), "demo", "--output", str(out), "--seed", "3"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "server ready" in proc.stderr and "drained and stopped" in proc.stderr
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert meta["size"] == (64, 64) and len(list(reader)) == 9
    previews = sorted((tmp_path / "out" / "demo-previews").glob("step-*.png"))
    assert [p.name for p in previews] == ["step-0002.png", "step-0004.png", "step-0006.png", "step-0008.png"]
