"""What runs: request validation, the expert schedule, the resumable denoise state machine, and
the stages of a generation (encode -> noise -> denoise[high] -> denoise[low] -> decode).

The engine never touches torch.distributed; parallel execution is applied to its models by the
``parallel`` package and workers are created by ``launch``.
"""

from engine.denoise import DenoiseRun, StepEvent, expert_schedule
from engine.errors import ModelError, ValidationError
from engine.loader import LoadedModel, load_model
from engine.model_info import ModelInfo, read_model_info
from engine.pipeline import Engine
from engine.request import GenerationRequest, ResolvedRequest, resolve_request
from engine.state import Conditioning, DenoiseState

__all__ = [
    "Conditioning", "DenoiseRun", "DenoiseState", "Engine", "GenerationRequest", "LoadedModel",
    "ModelError", "ModelInfo", "ResolvedRequest", "StepEvent", "ValidationError", "expert_schedule",
    "load_model", "read_model_info", "resolve_request",
]
