from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_NPY: _ClassVar[OutputFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DECODING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_NPY: OutputFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DECODING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "height", "width", "frames", "steps", "seed", "guidance", "guidance_low", "shift", "fps", "image", "output_format", "preview_every", "priority", "client_request_id", "boundary", "solver", "timesteps", "preset", "loras", "cache", "cache_high", "cache_low", "detach", "guidance_terms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_LOW_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIGH_FIELD_NUMBER: _ClassVar[int]
    CACHE_LOW_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_TERMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    frames: int
    steps: int
    seed: int
    guidance: float
    guidance_low: float
    shift: float
    fps: int
    image: bytes
    output_format: OutputFormat
    preview_every: int
    priority: int
    client_request_id: str
    boundary: float
    solver: str
    timesteps: _containers.RepeatedScalarFieldContainer[float]
    preset: str
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    cache: str
    cache_high: str
    cache_low: str
    detach: bool
    guidance_terms: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., guidance_low: _Optional[float] = ..., shift: _Optional[float] = ..., fps: _Optional[int] = ..., image: _Optional[bytes] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., preview_every: _Optional[int] = ..., priority: _Optional[int] = ..., client_request_id: _Optional[str] = ..., boundary: _Optional[float] = ..., solver: _Optional[str] = ..., timesteps: _Optional[_Iterable[float]] = ..., preset: _Optional[str] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ..., cache: _Optional[str] = ..., cache_high: _Optional[str] = ..., cache_low: _Optional[str] = ..., detach: _Optional[bool] = ..., guidance_terms: _Optional[str] = ...) -> None: ...

class Lora(_message.Message):
    __slots__ = ("name", "scale", "expert")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    expert: str
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ..., expert: _Optional[str] = ...) -> None: ...

class ResolvedSettings(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "height", "width", "frames", "steps", "seed", "guidance", "guidance_low", "shift", "fps", "boundary", "has_image", "output_format", "solver", "timesteps", "loras", "caches", "guidance_terms")
    class CachesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_LOW_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    HAS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CACHES_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_TERMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    height: int
    width: int
    frames: int
    steps: int
    seed: int
    guidance: float
    guidance_low: float
    shift: float
    fps: int
    boundary: float
    has_image: bool
    output_format: OutputFormat
    solver: str
    timesteps: _containers.RepeatedScalarFieldContainer[float]
    loras: _containers.RepeatedCompositeFieldContainer[Lora]
    caches: _containers.ScalarMap[str, str]
    guidance_terms: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., guidance: _Optional[float] = ..., guidance_low: _Optional[float] = ..., shift: _Optional[float] = ..., fps: _Optional[int] = ..., boundary: _Optional[float] = ..., has_image: _Optional[bool] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., solver: _Optional[str] = ..., timesteps: _Optional[_Iterable[float]] = ..., loras: _Optional[_Iterable[_Union[Lora, _Mapping]]] = ..., caches: _Optional[_Mapping[str, str]] = ..., guidance_terms: _Optional[str] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("settings", "client_request_id")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    settings: ResolvedSettings
    client_request_id: str
    def __init__(self, settings: _Optional[_Union[ResolvedSettings, _Mapping]] = ..., client_request_id: _Optional[str] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "estimated_wait_s")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    position: int
    estimated_wait_s: float
    def __init__(self, position: _Optional[int] = ..., estimated_wait_s: _Optional[float] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "expert", "stage", "elapsed_s", "eta_s", "timestep", "group", "forwards", "skipped")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    expert: str
    stage: str
    elapsed_s: float
    eta_s: float
    timestep: int
    group: str
    forwards: int
    skipped: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., expert: _Optional[str] = ..., stage: _Optional[str] = ..., elapsed_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., timestep: _Optional[int] = ..., group: _Optional[str] = ..., forwards: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "png", "width", "height")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    step: int
    png: bytes
    width: int
    height: int
    def __init__(self, step: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Decoding(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VideoChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_s", "encode_s", "denoise_s", "decode_s", "total_s")
    QUEUED_S_FIELD_NUMBER: _ClassVar[int]
    ENCODE_S_FIELD_NUMBER: _ClassVar[int]
    DENOISE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queued_s: float
    encode_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    def __init__(self, queued_s: _Optional[float] = ..., encode_s: _Optional[float] = ..., denoise_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("sha256", "size", "mime", "timings", "stats", "audio_wav", "audio_sample_rate")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MIME_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_WAV_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    mime: str
    timings: Timings
    stats: _struct_pb2.Struct
    audio_wav: bytes
    audio_sample_rate: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., mime: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., stats: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., audio_wav: _Optional[bytes] = ..., audio_sample_rate: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("job_id", "accepted", "queued", "started", "progress", "preview", "decoding", "video_chunk", "done")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    VIDEO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    accepted: Accepted
    queued: Queued
    started: Started
    progress: Progress
    preview: Preview
    decoding: Decoding
    video_chunk: VideoChunk
    done: Done
    def __init__(self, job_id: _Optional[str] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ..., video_chunk: _Optional[_Union[VideoChunk, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled", "state")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    state: JobState
    def __init__(self, cancelled: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "step", "total", "queue_position", "error", "settings", "detached", "has_result", "result_expires_in_s", "result_note")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    HAS_RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    RESULT_NOTE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    step: int
    total: int
    queue_position: int
    error: str
    settings: ResolvedSettings
    detached: bool
    has_result: bool
    result_expires_in_s: float
    result_note: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., queue_position: _Optional[int] = ..., error: _Optional[str] = ..., settings: _Optional[_Union[ResolvedSettings, _Mapping]] = ..., detached: _Optional[bool] = ..., has_result: _Optional[bool] = ..., result_expires_in_s: _Optional[float] = ..., result_note: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "kind", "is_default", "moe", "spatial_multiple", "temporal_stride", "defaults", "family", "tasks", "has_audio", "audio_sample_rate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MOE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_STRIDE_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    HAS_AUDIO_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    is_default: bool
    moe: bool
    spatial_multiple: int
    temporal_stride: int
    defaults: ResolvedSettings
    family: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    has_audio: bool
    audio_sample_rate: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., is_default: _Optional[bool] = ..., moe: _Optional[bool] = ..., spatial_multiple: _Optional[int] = ..., temporal_stride: _Optional[int] = ..., defaults: _Optional[_Union[ResolvedSettings, _Mapping]] = ..., family: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., has_audio: _Optional[bool] = ..., audio_sample_rate: _Optional[int] = ...) -> None: ...

class LoraFile(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "loras")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    loras: _containers.RepeatedCompositeFieldContainer[LoraFile]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., loras: _Optional[_Iterable[_Union[LoraFile, _Mapping]]] = ...) -> None: ...
