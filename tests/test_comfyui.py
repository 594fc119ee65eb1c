"""The ComfyUI node package (``comfyui/``) against ComfyUI's documented node contract, with the
smallest stand-ins for ``comfy.utils`` (``ProgressBar``) and ``comfy.model_management`` (the
interrupt), against a real Relay server's HTTP API."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "c0mfy"


class ProgressBar:
    """``comfy.utils.ProgressBar``'s interface: ``update_absolute(value, total, preview)``."""

    instances: list = []

    def __init__(self, total: int) -> None:
        self.total, self.calls = total, []
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None) -> None:
        self.calls.append((value, total, preview))


class InterruptProcessingException(Exception):
    """``comfy.model_management.InterruptProcessingException``."""


@pytest.fixture
def comfy(monkeypatch):
    """The two ComfyUI modules the node uses, as stand-ins; ``state["interrupt"]`` is the button."""
    state = {"interrupt": None}
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = lambda: bool(state["interrupt"] and state["interrupt"]())
    package = types.ModuleType("comfy")
    package.utils, package.model_management = utils, mm
    for name, module in (("comfy", package), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    ProgressBar.instances = []
    return state


@pytest.fixture(scope="module")
def nodes():
    """The node package, imported as ComfyUI does (a folder under custom_nodes/)."""
    spec = importlib.util.spec_from_file_location("relay_comfyui", REPO / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "comfyui")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["relay_comfyui"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tiny_models):
    from test_serve import LiveServer

    live = LiveServer(tiny_models["t2v"], max_queue=4, tokens=[TOKEN])
    live.start_http()
    yield live
    live.stop()


def test_node_contract(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["RelayGenerate"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["RelayGenerate"] == "Relay Generate"
    inputs = node.INPUT_TYPES()
    assert set(inputs) == {"required", "optional"}
    wanted = {"server", "prompt", "width", "height", "frames", "steps", "seed", "guidance"}
    assert wanted <= set(inputs["required"]) and {"token", "model", "negative_prompt", "lora", "cache"} <= set(
        inputs["optional"])
    for spec in (*inputs["required"].values(), *inputs["optional"].values()):
        assert spec[0] in ("STRING", "INT", "FLOAT") and isinstance(spec[1], dict)
    assert node.RETURN_TYPES == ("IMAGE", "AUDIO") and callable(getattr(node(), node.FUNCTION)) and node.CATEGORY


def test_node_returns_the_frames_shows_progress_and_previews(nodes, comfy, server, tiny_models):
    from relay.engine import Engine, GenerationRequest, load_model

    node = nodes.NODE_CLASS_MAPPINGS["RelayGenerate"]()
    images, audio = node.generate(server.http_url, "a red kite over the sea", 48, 32, 5, 4, 9, 4.0, token=TOKEN,
                                  negative_prompt="blurry", cache="fbc:0.1")
    # A silent model: silence as long as the video (5 frames at the tiny model's 8 fps).
    assert audio["sample_rate"] == 24000 and tuple(audio["waveform"].shape) == (1, 1, 15000)
    assert float(audio["waveform"].abs().max()) == 0.0
    assert tuple(images.shape) == (5, 32, 48, 3) and str(images.dtype) == "torch.float32"
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    reference = engine.generate(GenerationRequest(prompt="a red kite over the sea", negative_prompt="blurry",
                                                  width=48, height=32, frames=5, steps=4, seed=9, guidance=4.0,
                                                  cache="fbc:0.1"))
    np.testing.assert_allclose(images.numpy(), reference, atol=1e-5, rtol=0)
    bar = ProgressBar.instances[-1]
    assert bar.total == 4 and [value for value, _, _ in bar.calls][-1] == 4
    previews = [preview for _, _, preview in bar.calls if preview is not None]
    assert previews and previews[0][0] == "PNG" and previews[0][1].size[0] > 0


def test_interrupt_cancels_the_job_on_the_server(nodes, comfy, server):
    """ComfyUI's interrupt during the run: the node cancels the job and raises ComfyUI's exception."""
    from relay.serve.client import RelayClient

    node = nodes.NODE_CLASS_MAPPINGS["RelayGenerate"]()
    comfy["interrupt"] = lambda: bool(ProgressBar.instances and ProgressBar.instances[-1].calls)  # after a step
    with pytest.raises(InterruptProcessingException):
        node.generate(server.http_url, "a red kite over the sea", 64, 64, 5, 400, 1, 4.0, token=TOKEN)
    assert server.wait_idle(60)
    with RelayClient(server.target, token=TOKEN) as client:
        jobs = server.call(lambda: [job.job_id for job in server.engine.jobs.values()])
        states = {client.get_job(job_id).state for job_id in jobs}
    from relay.serve.gen.relay.v1 import relay_pb2 as pb

    assert pb.JOB_STATE_CANCELLED in states


def test_refusals_name_the_field(nodes, comfy, server):
    node = nodes.NODE_CLASS_MAPPINGS["RelayGenerate"]()
    with pytest.raises(Exception) as caught:
        node.generate(server.http_url, "x", 50, 32, 5, 4, 1, 4.0, token=TOKEN)
    assert "width" in str(caught.value)
    with pytest.raises(Exception) as caught:
        node.generate(server.http_url, "x", 48, 32, 5, 4, 1, 4.0, token="wrong")
    assert "401" in str(caught.value)


def test_node_returns_the_sound_of_an_ltx2_model(nodes, comfy, tiny_ltx2):
    """An LTX-2 server: IMAGE and AUDIO equal the engine's frames and waveform (16-bit WAV)."""
    from test_serve import LiveServer

    from relay.engine import Engine, GenerationRequest, load_model

    live = LiveServer(tiny_ltx2, tokens=[TOKEN])
    live.start_http()
    try:
        node = nodes.NODE_CLASS_MAPPINGS["RelayGenerate"]()
        images, audio = node.generate(live.http_url, "rain on a tin roof", 64, 64, 9, 3, 4, 3.0, token=TOKEN,
                                      guidance_terms="stg_blocks=1")
    finally:
        live.stop()
    engine = Engine(load_model(tiny_ltx2, dtype="fp32", device="cpu"))
    clip = engine.generate_clip(GenerationRequest(prompt="rain on a tin roof", width=64, height=64, frames=9, steps=3,
                                                  seed=4, guidance=3.0, guidance_terms="stg_blocks=1"))
    np.testing.assert_allclose(images.numpy(), clip.frames, atol=1e-5, rtol=0)
    assert audio["sample_rate"] == clip.sample_rate == 24000
    waveform = audio["waveform"].numpy()[0]
    assert waveform.shape == clip.audio.shape
    np.testing.assert_allclose(waveform, np.clip(clip.audio, -1, 1), atol=1.0 / 32767 + 1e-6, rtol=0)
