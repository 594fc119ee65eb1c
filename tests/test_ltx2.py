"""LTX-2 through Relay's engine: parity with diffusers' ``LTX2Pipeline`` and
``LTX2ImageToVideoPipeline`` (frames and sound, fp32 on CPU), resume after every step, the
sound in the written files, and the request rules.

The tiny model is written by ``relay make-tiny --kind ltx2``'s code in the real diffusers
layout; diffusers loads the same folder for the reference. STG is pointed at the tiny model's
last block (the pipeline's default block 28 does not exist in a 2-block model, where diffusers
would silently perturb nothing).
"""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest
import torch

PROMPT = "a red robot walking through a neon city, footsteps and rain"
NEGATIVE = "blurry, silent"
# 64 is the tiny VAE's smallest side; 17 frames = 3 latent frames (an image frame and two more).
BASE = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=96, frames=17, steps=3, seed=5, fps=24)
#: Every guidance term on and distinct, so each reaches its own place in the arithmetic.
TERMS = dict(audio=5.0, stg=0.5, audio_stg=2.0, modality=2.0, audio_modality=1.5, rescale=0.7, audio_rescale=0.3)
TOL = 1e-5


@pytest.fixture(scope="module")
def ltx2(tiny_ltx2):
    return tiny_ltx2


@pytest.fixture(scope="module")
def engine(ltx2):
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    return Engine(load_model(ltx2, dtype="fp32", device="cpu"))


def _terms(**overrides) -> str:
    terms = {**TERMS, "stg_blocks": 1, **overrides}
    return ",".join(f"{k}={v}" for k, v in terms.items())


def _diffusers(folder, image=None, *, guidance=3.0, **terms):
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    t = {**TERMS, **terms}
    cls = LTX2ImageToVideoPipeline if image is not None else LTX2Pipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    kwargs = {"image": image} if image is not None else {}
    video, audio = pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=BASE["height"], width=BASE["width"], num_frames=BASE["frames"],
        num_inference_steps=BASE["steps"], frame_rate=float(BASE["fps"]), guidance_scale=guidance,
        audio_guidance_scale=t["audio"], stg_scale=t["stg"], audio_stg_scale=t["audio_stg"],
        modality_scale=t["modality"], audio_modality_scale=t["audio_modality"], guidance_rescale=t["rescale"],
        audio_guidance_rescale=t["audio_rescale"], spatio_temporal_guidance_blocks=[1],
        generator=torch.Generator("cpu").manual_seed(BASE["seed"]), output_type="np", return_dict=False, **kwargs)
    return np.asarray(video)[0], audio[0].float().numpy(), pipe.vocoder.config.output_sampling_rate


def _request(**fields):
    from relay.engine.request import GenerationRequest

    return GenerationRequest(**{**BASE, "guidance": 3.0, "guidance_terms": _terms(), **fields})


def test_text_to_video_with_sound_equals_diffusers(ltx2, engine):
    clip = engine.generate_clip(_request())
    frames, audio, rate = _diffusers(ltx2)
    assert clip.frames.shape == frames.shape == (17, 64, 96, 3)
    assert clip.audio.shape == audio.shape and clip.audio.shape[0] == 2 and clip.sample_rate == rate == 24000
    np.testing.assert_allclose(clip.frames, frames, atol=TOL, rtol=0)
    np.testing.assert_allclose(clip.audio, audio, atol=TOL, rtol=0)
    assert np.abs(audio).mean() > 1e-2  # a real waveform, not silence


def test_guidance_off_terms_equal_diffusers(ltx2, engine):
    """Plain CFG only (STG, modality isolation and the rescales off): one guided forward pair."""
    off = dict(stg=0.0, audio_stg=0.0, modality=1.0, audio_modality=1.0, rescale=0.0, audio_rescale=0.0)
    clip = engine.generate_clip(_request(guidance=4.0, guidance_terms=_terms(**off)))
    frames, audio, _ = _diffusers(ltx2, guidance=4.0, **off)
    np.testing.assert_allclose(clip.frames, frames, atol=TOL, rtol=0)
    np.testing.assert_allclose(clip.audio, audio, atol=TOL, rtol=0)


def test_stg_is_skipped_where_it_cannot_perturb(ltx2, tmp_path):
    """A transformer without perturbable attention (``perturbed_attn`` false, as the published
    LTX-2.0 config): the STG forward would equal the conditional one, so Relay skips it (3
    forwards a step, not 4) and still equals diffusers, which runs it."""
    import shutil

    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    folder = tmp_path / "ltx2-no-perturb"
    shutil.copytree(ltx2, folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["perturbed_attn"] = False
    config_file.write_text(json.dumps(config))
    engine = Engine(load_model(folder, dtype="fp32", device="cpu"))
    resolved = engine.resolve(_request())
    run = engine.start(engine.prepare(resolved))
    events = []
    run.run(callback=events.append)
    clip = engine.decode_clip(run)
    assert [e.forwards for e in events] == [3, 3, 3]
    frames, audio, _ = _diffusers(folder)
    np.testing.assert_allclose(clip.frames, frames, atol=TOL, rtol=0)
    np.testing.assert_allclose(clip.audio, audio, atol=TOL, rtol=0)


def test_image_to_video_equals_diffusers(ltx2, engine, png_bytes):
    from PIL import Image

    clip = engine.generate_clip(_request(image=png_bytes))
    frames, audio, _ = _diffusers(ltx2, Image.open(io.BytesIO(png_bytes)).convert("RGB"))
    np.testing.assert_allclose(clip.frames, frames, atol=TOL, rtol=0)
    np.testing.assert_allclose(clip.audio, audio, atol=TOL, rtol=0)
    text_only = engine.generate_clip(_request())
    assert np.abs(text_only.frames[0] - clip.frames[0]).max() > 0.05  # the image shapes the first frame


@pytest.mark.parametrize("with_image", [False, True])
def test_resume_after_every_step_is_bit_identical(engine, png_bytes, with_image):
    from relay.engine.state import DenoiseState

    resolved = engine.resolve(_request(image=png_bytes if with_image else None))
    whole = engine.start(engine.prepare(resolved))
    whole.run()
    reference = engine.decode_clip(whole)
    state = engine.prepare(resolved)
    events = []
    while not state.done:
        run = engine.start(DenoiseState.load(state.to_bytes()))  # a fresh run from the wire format
        events.append(run.step())
        state = run.snapshot()
    clip = engine.decode_clip(state)
    assert [e.forwards for e in events] == [4, 4, 4]  # cond, uncond, STG, modality isolation
    np.testing.assert_array_equal(clip.frames, reference.frames)
    np.testing.assert_array_equal(clip.audio, reference.audio)


def test_generate_writes_the_sound(ltx2, engine, relay, tmp_path):
    """``.npy`` gets a ``.wav`` beside it; ``.mp4`` gets an AAC track of the same sound."""
    import av

    clip = engine.generate_clip(_request())
    flags = ["--model", ltx2, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--height", "64", "--width", "96",
             "--frames", "17", "--steps", "3", "--seed", "5", "--guidance", "3", "--guidance-terms", _terms(),
             "--dtype", "fp32"]
    result = relay("generate", *flags, "--output", tmp_path / "clip.npy")
    assert result.code == 0, result.err
    assert "with sound" in result.err
    np.testing.assert_array_equal(np.load(tmp_path / "clip.npy"), clip.frames)
    with wave.open(str(tmp_path / "clip.wav")) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 24000, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2).T
    np.testing.assert_array_equal(pcm, np.round(np.clip(clip.audio, -1, 1) * 32767).astype(np.int16))

    assert relay("generate", *flags, "--output", tmp_path / "clip.mp4").code == 0
    with av.open(str(tmp_path / "clip.mp4")) as container:
        kinds = {s.type: s for s in container.streams}
        assert set(kinds) == {"video", "audio"}
        assert kinds["audio"].codec_context.name == "aac" and kinds["audio"].rate == 24000
        assert kinds["video"].codec_context.name == "h264"
        sound = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    # AAC is lossy (its encoder delay is undone by the decoder, from the container's edit list):
    # the decoded track follows the generated waveform sample for sample, closely.
    decoded = sound[:, :clip.audio.shape[1]]
    n = decoded.shape[1]
    assert n > 0.9 * clip.audio.shape[1]
    corr = np.corrcoef(decoded.ravel(), clip.audio[:, :n].ravel())[0, 1]
    assert corr > 0.9, corr


def test_a_named_kernel_on_one_rank_equals_diffusers_attention(ltx2, engine, relay, tmp_path):
    """``--attention cpu-flash``: the video self-attention (STG's perturbed pass included) runs
    Relay's kernel on the whole sequence, as on a CUDA rank; frames and sound equal diffusers'
    attention (the reference engine's)."""
    clip = engine.generate_clip(_request())
    flags = ["--model", ltx2, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--height", "64", "--width", "96",
             "--frames", "17", "--steps", "3", "--seed", "5", "--guidance", "3", "--guidance-terms", _terms(),
             "--dtype", "fp32", "--attention", "cpu-flash"]
    result = relay("generate", *flags, "--output", tmp_path / "clip.npy", "--stats", tmp_path / "stats.json")
    assert result.code == 0, result.err
    np.testing.assert_allclose(np.load(tmp_path / "clip.npy"), clip.frames, atol=1e-5, rtol=0)
    import json

    assert json.loads((tmp_path / "stats.json").read_text())["layout"]["groups"][0]["attention"] == "cpu-flash"


def test_cli_checkpoint_and_resume_is_bit_identical(ltx2, relay, tmp_path):
    """``relay generate --checkpoint-at 1,2`` then ``relay resume`` of each snapshot: the same
    frames and the same ``.wav`` as the uninterrupted run."""
    flags = ["--model", ltx2, "--prompt", PROMPT, "--height", "64", "--width", "96", "--frames", "17",
             "--steps", "3", "--seed", "5", "--guidance-terms", _terms(), "--dtype", "fp32"]
    whole = relay("generate", *flags, "--output", tmp_path / "whole.npy", "--checkpoint-dir", tmp_path / "ck",
                  "--checkpoint-at", "1,2")
    assert whole.code == 0, whole.err
    for step in (1, 2):
        out = tmp_path / f"resumed-{step}.npy"
        result = relay("resume", tmp_path / "ck" / f"step-{step:04d}.pt", "--model", ltx2, "--dtype", "fp32",
                       "--output", out)
        assert result.code == 0, result.err
        np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "whole.npy"))
        assert out.with_suffix(".wav").read_bytes() == (tmp_path / "whole.wav").read_bytes()
    # The snapshot on another family's model is refused up front, naming --model.
    wrong = relay("resume", tmp_path / "ck" / "step-0001.pt", "--output", tmp_path / "wrong.npy")
    assert wrong.code == 2 and "--model" in wrong.err and "dense" in wrong.err, wrong.err


def test_settings_and_refusals(ltx2, relay, tmp_path):
    from relay.engine.errors import ValidationError
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request

    info = read_model_info(ltx2)
    assert (info.family, info.kind, info.has_audio, info.audio_sample_rate) == ("ltx2", "ti2v", True, 24000)
    assert (info.spatial_multiple, info.temporal_stride) == (32, 8)
    resolved = resolve_request(GenerationRequest(prompt="x"), info)
    # Defaults: the folder's relay.json, else diffusers' LTX2Pipeline; the shift follows the size.
    assert (resolved.height, resolved.width, resolved.frames, resolved.guidance) == (64, 64, 9, 3.0)
    assert resolved.guidance_terms == {"audio": 7.0, "stg": 1.0, "audio_stg": 1.0, "modality": 3.0,
                                       "audio_modality": 3.0, "rescale": 0.7, "audio_rescale": 0.7,
                                       "stg_blocks": (1,)}
    bigger = resolve_request(GenerationRequest(prompt="x", height=512, width=768, frames=121), info)
    assert bigger.shift > resolved.shift and "resolution-dependent" in bigger.sources["shift"]
    for fields, name in ((dict(frames=10), "frames"), (dict(height=48), "height"), (dict(guidance_low=2.0), "guidance_low"),
                         (dict(guidance_terms="loud=3"), "guidance_terms"), (dict(guidance_terms="stg_blocks=2"), "guidance_terms"),
                         (dict(guidance_terms="rescale=2"), "guidance_terms"), (dict(cache="fbc:0.05"), "cache"),
                         (dict(solver="unipc"), "solver"), (dict(preset="lightning"), "preset")):
        with pytest.raises(ValidationError) as caught:
            resolve_request(GenerationRequest(prompt="x", **fields), info)
        assert caught.value.field == name, (fields, caught.value)
    out = tmp_path / "x.mp4"
    for flags, name in ((["--frames", "10"], "--frames"), (["--guidance-terms", "audio"], "--guidance-terms"),
                        (["--nproc", "2", "--vae-parallel"], "--vae-parallel")):
        result = relay("generate", "--model", ltx2, "--prompt", "x", *flags, "--output", out)
        assert result.code == 2 and name in result.err, (flags, result.err)
    assert not out.exists()


def test_wan_takes_no_guidance_terms(tiny_models):
    from relay.engine.errors import ValidationError
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request

    with pytest.raises(ValidationError) as caught:
        resolve_request(GenerationRequest(prompt="x", guidance_terms="audio=7"), read_model_info(tiny_models["t2v"]))
    assert caught.value.field == "guidance_terms"


def test_make_tiny_cli_writes_an_ltx2_folder(relay, tmp_path):
    result = relay("make-tiny", tmp_path / "m", "--kind", "ltx2")
    assert result.code == 0, result.err
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline" and index["vocoder"][1] == "LTX2Vocoder"


SMALL = dict(height=64, width=96, frames=17)
# name: (layout kwargs, size/frames, image, guidance-term overrides)
GROUP_CASES = {
    "ulysses2": (dict(ulysses_degree=2), SMALL, False, {}),
    # 3 x 3 x 3 = 27 video tokens over a ring of 2: padded (the padded keys are dropped in the
    # video self-attention and never reach the audio's video-to-audio attention).
    "ring2-padded": (dict(ring_degree=2), dict(height=96, width=96, frames=17), False, {}),
    # Per-token timesteps (the image frame's tokens at 0) split with the tokens; FSDP2 from meta.
    "i2v-ulysses2-fsdp2": (dict(ulysses_degree=2, fsdp_degree=2), SMALL, True, {}),
    # Four branches (cond, uncond, STG, modality) over two halves: two each.
    "cfg2": (dict(cfg_degree=2), SMALL, False, {}),
    # Three branches (modality isolation off): the second half runs one extra, dropped.
    "cfg2-ulysses2-fsdp2-three-branches": (dict(cfg_degree=2, ulysses_degree=2, fsdp_degree=2), SMALL, False,
                                           dict(modality=1.0, audio_modality=1.0)),
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_group_output_equals_single_process(case, ltx2, engine, png_bytes):
    """``--nproc 2`` on local processes (gloo, fp32): frames and sound equal one process's."""
    from relay.engine.model_info import read_model_info
    from relay.engine.stages import request_experts
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    layout_kwargs, size, with_image, terms = GROUP_CASES[case]
    resolved = engine.resolve(_request(image=png_bytes if with_image else None, guidance_terms=_terms(**terms), **size))
    reference = engine.generate_clip(resolved)
    layout = ParallelLayout(**layout_kwargs)
    info = read_model_info(ltx2)
    spec = WorkerSpec(model=str(ltx2), layout=layout, dtype="fp32", device_type="cpu")
    with Executor(plan_groups(info, resolved, layout=layout), spec, backend="mp", build_timeout_s=300) as executor:
        ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(info, resolved))
        clip = ticket.clip(timeout=300)
        shares = executor.groups[0].call("parameter_bytes", timeout_s=60)
    forwards = ticket.stats.to_dict()["experts"]["dense"]["forwards"]
    assert forwards == resolved.steps * (3 if terms else 4)  # the request's branches, however split
    np.testing.assert_allclose(clip.frames, reference.frames, atol=1e-4, rtol=0)
    np.testing.assert_allclose(clip.audio, reference.audio, atol=1e-4, rtol=0)
    assert clip.sample_rate == reference.sample_rate
    if layout.fsdp_degree > 1:  # each rank holds half the transformer
        totals = [share["dense"] for share in shares]
        assert max(totals) < 0.6 * sum(totals), totals


def test_served_beside_a_wan_model(ltx2, tiny_models, engine, relay, tmp_path):
    """One ``relay serve`` with a Wan and an LTX-2 model: ListModels tells them apart, and each
    request equals its single-process run (the LTX-2 one with its sound, as ``.wav`` beside
    the ``.npy``; its ``.mp4`` with an AAC track)."""
    import subprocess
    import sys

    from relay.cli.service import _wait_serving
    from relay.serve.client import RelayClient

    wan = tiny_models["t2v"]
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--model", str(wan), "--model", str(ltx2),
                               "--port", "0", "--port-file", str(port_file), "--dtype", "fp32"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        target = f"127.0.0.1:{_wait_serving(server, port_file, timeout_s=180)}"
        with RelayClient(target) as client:
            models = {m.name: m for m in client.list_models().models}
        assert (models[ltx2.name].family, list(models[ltx2.name].tasks), models[ltx2.name].has_audio,
                models[ltx2.name].audio_sample_rate) == ("ltx2", ["t2v", "i2v"], True, 24000)
        assert (models[wan.name].family, list(models[wan.name].tasks), models[wan.name].has_audio) == ("wan2.2", ["t2v"], False)
        assert models[ltx2.name].defaults.guidance_terms.startswith("audio=7")

        settings = ["--height", "64", "--width", "96", "--frames", "17", "--steps", "3", "--seed", "5", "--guidance", "3"]
        result = relay("submit", "--server", target, "--model", ltx2.name, "--prompt", PROMPT, "--negative-prompt",
                       NEGATIVE, *settings, "--guidance-terms", _terms(), "--output", tmp_path / "ltx.npy", "--quiet")
        assert result.code == 0, result.err
        reference = engine.generate_clip(_request())
        np.testing.assert_array_equal(np.load(tmp_path / "ltx.npy"), reference.frames)
        with wave.open(str(tmp_path / "ltx.wav")) as wav:
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2).T
        np.testing.assert_array_equal(pcm, np.round(np.clip(reference.audio, -1, 1) * 32767).astype(np.int16))
        result = relay("submit", "--server", target, "--model", ltx2.name, "--prompt", PROMPT, *settings,
                       "--output", tmp_path / "ltx.mp4", "--quiet")
        assert result.code == 0, result.err
        import av

        with av.open(str(tmp_path / "ltx.mp4")) as container:
            assert {s.type for s in container.streams} == {"video", "audio"}

        wan_flags = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "4", "--seed", "2"]
        assert relay("submit", "--server", target, "--model", wan.name, "--prompt", PROMPT, *wan_flags,
                     "--output", tmp_path / "wan.npy", "--quiet").code == 0
        assert not (tmp_path / "wan.wav").exists()
        assert relay("generate", "--model", wan, "--prompt", PROMPT, *wan_flags, "--dtype", "fp32",
                     "--output", tmp_path / "wan-ref.npy").code == 0
        np.testing.assert_array_equal(np.load(tmp_path / "wan.npy"), np.load(tmp_path / "wan-ref.npy"))
        # A Wan model refuses LTX-2's terms, naming the field.
        refused = relay("submit", "--server", target, "--model", wan.name, "--prompt", PROMPT, *wan_flags,
                        "--guidance-terms", "audio=7", "--output", tmp_path / "no.npy", "--quiet")
        assert refused.code == 2 and "guidance_terms" in refused.err
    finally:
        from conftest import stop_server

        stop_server(server)
        log.close()


@pytest.mark.parametrize("executor", ["torchrun", "ray"])
def test_generate_on_torchrun_and_ray_equals_one_process(executor, ltx2, engine, tmp_path):
    """``relay generate --nproc 2 --ulysses 2`` under torchrun and on Ray actors: the same frames
    and sound (``.npy`` + ``.wav``) as one process."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / f"{executor}.npy"
    args = [sys.executable, "-m", "relay.cli", "generate", "--model", str(ltx2), "--executor", executor,
            "--nproc", "2", "--ulysses", "2", "--dtype", "fp32", "--device", "cpu", "--prompt", PROMPT,
            "--negative-prompt", NEGATIVE, "--height", "64", "--width", "96", "--frames", "17", "--steps", "3",
            "--seed", "5", "--guidance", "3", "--guidance-terms", _terms(), "--output", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    reference = engine.generate_clip(_request())
    np.testing.assert_allclose(np.load(out), reference.frames, atol=1e-4, rtol=0)
    with wave.open(str(out.with_suffix(".wav"))) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2).T.astype(np.float32)
    np.testing.assert_allclose(pcm / 32767.0, np.clip(reference.audio, -1, 1), atol=2.0 / 32767 + 1e-4, rtol=0)
