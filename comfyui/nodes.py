"""The "Relay Generate" node: submit to a Relay server, follow it in ComfyUI's progress bar
with the live previews, cancel on ComfyUI's interrupt, return the frames as an IMAGE batch and
the sound as AUDIO (LTX-2; a silent model gives silence as long as the video).

Written against ComfyUI's node contract of v0.3.x (``INPUT_TYPES`` / ``RETURN_TYPES`` /
``FUNCTION`` / ``CATEGORY``, ``comfy.utils.ProgressBar.update_absolute`` with a
``("PNG", image, size)`` preview, ``comfy.model_management.processing_interrupted`` and
``InterruptProcessingException``); IMAGE is a float tensor ``[B, H, W, C]`` in 0..1, AUDIO a
``{"waveform": float [1, channels, samples] in -1..1, "sample_rate": int}``.
"""

from __future__ import annotations

import base64
import io

from relay.serve.http_client import RelayHttp  # the wan-relay[client] install

CACHES = "none"


class RelayGenerate:
    """Generates a video on a Relay server (Wan 2.2) and returns its frames."""

    CATEGORY = "Relay"
    RETURN_TYPES = ("IMAGE", "AUDIO")
    RETURN_NAMES = ("frames", "audio")
    FUNCTION = "generate"
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        """The node's inputs (ComfyUI's widget specs)."""
        return {
            "required": {
                "server": ("STRING", {"default": "http://127.0.0.1:8080"}),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "width": ("INT", {"default": 832, "min": 16, "max": 2048, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 2048, "step": 16}),
                "frames": ("INT", {"default": 81, "min": 1, "max": 257, "step": 4}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 1000}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
                "guidance": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1}),
            },
            "optional": {
                "token": ("STRING", {"default": ""}),
                "model": ("STRING", {"default": ""}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "lora": ("STRING", {"default": "", "tooltip": "NAME[:SCALE] in the server's --lora-dir, comma-separated"}),
                "cache": ("STRING", {"default": CACHES, "tooltip": "none, fbc:0.05, taylorseer, ..."}),
                "guidance_terms": ("STRING", {"default": "", "tooltip": "LTX-2: audio=7,stg=1,modality=3,..."}),
                "fps": ("INT", {"default": 0, "min": 0, "max": 120, "tooltip": "0: the model's"}),
            },
        }

    def generate(self, server, prompt, width, height, frames, steps, seed, guidance, token="", model="",
                 negative_prompt="", lora="", cache=CACHES, guidance_terms="", fps=0):
        """Runs the job to the end and returns ``(IMAGE, AUDIO)``."""
        import comfy.model_management as mm
        import comfy.utils
        import numpy as np
        import torch

        client = RelayHttp(server, token)
        body = {"prompt": prompt, "model": model, "size": f"{width}x{height}", "frames": frames, "steps": steps,
                "seed": seed, "guidance": guidance, "negative_prompt": negative_prompt, "output_format": "npy",
                "loras": parse_loras(lora)}
        if cache and cache != CACHES:
            body["cache"] = cache
        if guidance_terms.strip():
            body["guidance_terms"] = guidance_terms.strip()
        if fps:
            body["fps"] = fps
        video = client.create(body)
        bar = comfy.utils.ProgressBar(steps)
        try:
            for kind, data in client.events(video["id"]):
                if mm.processing_interrupted():
                    client.cancel(video["id"])
                    raise mm.InterruptProcessingException()
                if kind == "progress":
                    bar.update_absolute(min(data["step"], steps), steps)
                elif kind == "preview":
                    bar.update_absolute(min(data["step"], steps), steps, ("PNG", _image(data["png"]), 512))
                elif kind in ("failed", "cancelled"):
                    raise RuntimeError(f"Relay job {video['id']} {kind}: {data.get('error') or ''}")
        except mm.InterruptProcessingException:
            raise
        except BaseException:
            try:
                client.cancel(video["id"])
            finally:
                raise
        frames_np = np.load(io.BytesIO(client.content(video["id"])))
        images = torch.from_numpy(np.ascontiguousarray(frames_np, dtype=np.float32))
        return images, _audio(client.audio(video["id"]), frames=frames_np.shape[0], seconds=video.get("seconds"),
                              fps=fps)


def parse_loras(text: str) -> list[dict]:
    """``"a.safetensors:0.8, b.safetensors"`` -> the API's LoRA list."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, scale = item.rpartition(":") if ":" in item else (item, "", "")
        out.append({"name": name or item, "scale": float(scale) if scale else 1.0})
    return out


#: Sample rate of the silence a silent model's AUDIO output holds.
SILENT_RATE = 24000


def _audio(wav: bytes | None, *, frames: int, seconds, fps: int = 0) -> dict:
    """ComfyUI's AUDIO from a WAV file (16-bit PCM), or silence as long as the video (``frames``
    at ``fps``; unset, the job's rate: its ``seconds`` are ``(frames - 1) / fps``)."""
    import wave

    import numpy as np
    import torch

    if wav is None:
        if not fps:
            fps = (frames - 1) / float(seconds) if seconds and float(seconds) > 0 else 24
        length = round(frames / fps * SILENT_RATE)
        return {"waveform": torch.zeros(1, 1, length), "sample_rate": SILENT_RATE}
    with wave.open(io.BytesIO(wav)) as sound:
        channels, rate = sound.getnchannels(), sound.getframerate()
        pcm = np.frombuffer(sound.readframes(sound.getnframes()), dtype="<i2")
    samples = pcm.reshape(-1, channels).T.astype(np.float32) / 32767.0
    return {"waveform": torch.from_numpy(np.ascontiguousarray(samples))[None], "sample_rate": rate}


def _image(png_b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")


NODE_CLASS_MAPPINGS = {"RelayGenerate": RelayGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"RelayGenerate": "Relay Generate"}
