"""The "Relay Generate" node: submit to a Relay server, follow it in ComfyUI's progress bar
with the live previews, cancel on ComfyUI's interrupt, return the frames as an IMAGE batch.

Written against ComfyUI's node contract of v0.3.x (``INPUT_TYPES`` / ``RETURN_TYPES`` /
``FUNCTION`` / ``CATEGORY``, ``comfy.utils.ProgressBar.update_absolute`` with a
``("PNG", image, size)`` preview, ``comfy.model_management.processing_interrupted`` and
``InterruptProcessingException``); IMAGE is a float tensor ``[B, H, W, C]`` in 0..1.
"""

from __future__ import annotations

import base64
import io

from relay.serve.http_client import RelayHttp  # the wan-relay[client] install

CACHES = "none"


class RelayGenerate:
    """Generates a video on a Relay server (Wan 2.2) and returns its frames."""

    CATEGORY = "Relay"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
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
            },
        }

    def generate(self, server, prompt, width, height, frames, steps, seed, guidance, token="", model="",
                 negative_prompt="", lora="", cache=CACHES):
        """Runs the job to the end and returns ``(IMAGE,)``."""
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
        return (torch.from_numpy(np.ascontiguousarray(frames_np, dtype=np.float32)),)


def parse_loras(text: str) -> list[dict]:
    """``"a.safetensors:0.8, b.safetensors"`` -> the API's LoRA list."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, scale = item.rpartition(":") if ":" in item else (item, "", "")
        out.append({"name": name or item, "scale": float(scale) if scale else 1.0})
    return out


def _image(png_b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")


NODE_CLASS_MAPPINGS = {"RelayGenerate": RelayGenerate}
NODE_DISPLAY_NAME_MAPPINGS = {"RelayGenerate": "Relay Generate"}
