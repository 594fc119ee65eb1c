"""What runs: request validation, the expert schedule, the resumable denoise state machine, and
the stages of a generation (encode -> noise -> denoise[high] -> denoise[low] -> decode).

The engine never touches torch.distributed; parallel execution is applied to its models by the
``parallel`` package and workers are created by ``launch``.
"""

from relay.engine.denoise import DenoiseRun, StepEvent, expert_schedule
from relay.engine.errors import ModelError, ValidationError
from relay.engine.loader import LoadedModel, load_model
from relay.engine.model_info import ModelInfo, read_model_info
from relay.engine.pipeline import Engine
from relay.engine.request import GenerationRequest, ResolvedRequest, resolve_request
from relay.engine.state import Conditioning, DenoiseState

__all__ = [
    "Conditioning", "DenoiseRun", "DenoiseState", "Engine", "GenerationRequest", "LoadedModel",
    "ModelError", "ModelInfo", "ResolvedRequest", "StepEvent", "ValidationError", "expert_schedule",
    "load_model", "read_model_info", "resolve_request",
]
