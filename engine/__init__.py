"""What runs: request validation, model loading, the expert schedule, the resumable denoise
loop, decode, the stage scheduler and the async service engine.

The engine never touches torch.distributed; parallel execution is applied to its models by the
``parallel`` package and workers are created by ``launch``. Everything a model family knows
lives in its spec (:mod:`engine.models`). The names below are imported on first use, so
``import relay.engine`` costs nothing (the CLI answers ``--help`` without torch).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Conditioning": "relay.engine.state", "DenoiseState": "relay.engine.state",
    "DenoiseRun": "relay.engine.denoise", "StepEvent": "relay.engine.denoise",
    "Engine": "relay.engine.pipeline",
    "GenerationRequest": "relay.engine.request", "ResolvedRequest": "relay.engine.request",
    "resolve_request": "relay.engine.request",
    "LoadedModel": "relay.engine.loader", "load_model": "relay.engine.loader",
    "ModelInfo": "relay.engine.model_info", "read_model_info": "relay.engine.model_info",
    "ModelError": "relay.engine.errors", "ValidationError": "relay.engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relay.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
