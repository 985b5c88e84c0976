from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_TRANSPORT_PATH: _ClassVar[ArtifactTransport]
    ARTIFACT_TRANSPORT_INLINE_BYTES: _ClassVar[ArtifactTransport]

class RunEndStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_END_STATUS_UNSPECIFIED: _ClassVar[RunEndStatus]
    RUN_END_STATUS_FAILED: _ClassVar[RunEndStatus]
    RUN_END_STATUS_CANCELLED: _ClassVar[RunEndStatus]
    RUN_END_STATUS_ABORTED: _ClassVar[RunEndStatus]
    RUN_END_STATUS_REJECTED: _ClassVar[RunEndStatus]
ARTIFACT_TRANSPORT_PATH: ArtifactTransport
ARTIFACT_TRANSPORT_INLINE_BYTES: ArtifactTransport
RUN_END_STATUS_UNSPECIFIED: RunEndStatus
RUN_END_STATUS_FAILED: RunEndStatus
RUN_END_STATUS_CANCELLED: RunEndStatus
RUN_END_STATUS_ABORTED: RunEndStatus
RUN_END_STATUS_REJECTED: RunEndStatus

class JsonMap(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("kind", "path", "scale", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    scale: float
    name: str
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., scale: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("task", "model", "backend", "inputs", "config", "adapters")
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    task: str
    model: str
    backend: str
    inputs: JsonMap
    config: JsonMap
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    def __init__(self, task: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., inputs: _Optional[_Union[JsonMap, _Mapping]] = ..., config: _Optional[_Union[JsonMap, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("kind", "path", "mime", "width", "height", "num_frames", "transport", "data", "sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MIME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    mime: str
    width: int
    height: int
    num_frames: int
    transport: ArtifactTransport
    data: bytes
    sha256: str
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., mime: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., transport: _Optional[_Union[ArtifactTransport, str]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class RunReport(_message.Message):
    __slots__ = ("run_id", "task", "model", "backend", "execution_mode", "schema_version", "job_id", "batch_group_id", "batch_size", "timings", "memory", "backend_timeline", "config_resolved", "stream_events", "error", "trace_id", "worker_id", "enqueued_at_ms", "queue_wait_ms", "trace", "events_streamed", "engine", "recorded_in")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TIMELINE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    STREAM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_STREAMED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_IN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task: str
    model: str
    backend: str
    execution_mode: str
    schema_version: str
    job_id: str
    batch_group_id: str
    batch_size: int
    timings: JsonMap
    memory: JsonMap
    backend_timeline: JsonMap
    config_resolved: JsonMap
    stream_events: JsonMap
    error: str
    trace_id: str
    worker_id: str
    enqueued_at_ms: int
    queue_wait_ms: float
    trace: JsonMap
    events_streamed: bool
    engine: JsonMap
    recorded_in: str
    def __init__(self, run_id: _Optional[str] = ..., task: _Optional[str] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., execution_mode: _Optional[str] = ..., schema_version: _Optional[str] = ..., job_id: _Optional[str] = ..., batch_group_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., timings: _Optional[_Union[JsonMap, _Mapping]] = ..., memory: _Optional[_Union[JsonMap, _Mapping]] = ..., backend_timeline: _Optional[_Union[JsonMap, _Mapping]] = ..., config_resolved: _Optional[_Union[JsonMap, _Mapping]] = ..., stream_events: _Optional[_Union[JsonMap, _Mapping]] = ..., error: _Optional[str] = ..., trace_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., enqueued_at_ms: _Optional[int] = ..., queue_wait_ms: _Optional[float] = ..., trace: _Optional[_Union[JsonMap, _Mapping]] = ..., events_streamed: _Optional[bool] = ..., engine: _Optional[_Union[JsonMap, _Mapping]] = ..., recorded_in: _Optional[str] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("outputs", "metadata")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Artifact]
    metadata: RunReport
    def __init__(self, outputs: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., metadata: _Optional[_Union[RunReport, _Mapping]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ok", "worker_id", "state", "model_loaded", "queue_depth", "inflight", "last_error", "gpu_mem_used_gb", "capacity", "models", "loaded_models", "backend", "tags", "draining", "version", "instance_id", "loaded_adapters", "engine", "weights", "store_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    GPU_MEM_USED_GB_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    worker_id: str
    state: str
    model_loaded: bool
    queue_depth: int
    inflight: int
    last_error: str
    gpu_mem_used_gb: float
    capacity: int
    models: _containers.RepeatedScalarFieldContainer[str]
    loaded_models: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    draining: bool
    version: str
    instance_id: str
    loaded_adapters: _containers.RepeatedScalarFieldContainer[str]
    engine: JsonMap
    weights: WeightsReport
    store_id: str
    def __init__(self, ok: _Optional[bool] = ..., worker_id: _Optional[str] = ..., state: _Optional[str] = ..., model_loaded: _Optional[bool] = ..., queue_depth: _Optional[int] = ..., inflight: _Optional[int] = ..., last_error: _Optional[str] = ..., gpu_mem_used_gb: _Optional[float] = ..., capacity: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., loaded_models: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., draining: _Optional[bool] = ..., version: _Optional[str] = ..., instance_id: _Optional[str] = ..., loaded_adapters: _Optional[_Iterable[str]] = ..., engine: _Optional[_Union[JsonMap, _Mapping]] = ..., weights: _Optional[_Union[WeightsReport, _Mapping]] = ..., store_id: _Optional[str] = ...) -> None: ...

class ModelWeights(_message.Message):
    __slots__ = ("model", "found", "where", "source", "required")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    model: str
    found: bool
    where: str
    source: str
    required: bool
    def __init__(self, model: _Optional[str] = ..., found: _Optional[bool] = ..., where: _Optional[str] = ..., source: _Optional[str] = ..., required: _Optional[bool] = ...) -> None: ...

class WeightsReport(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelWeights]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelWeights, _Mapping]]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("request", "job_id", "attempt", "trace_id", "execution_mode", "enqueued_at_ms", "started_at_ms")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_MODE_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    job_id: str
    attempt: int
    trace_id: str
    execution_mode: str
    enqueued_at_ms: int
    started_at_ms: int
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., trace_id: _Optional[str] = ..., execution_mode: _Optional[str] = ..., enqueued_at_ms: _Optional[int] = ..., started_at_ms: _Optional[int] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("event", "stage", "data", "timestamp_ms")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    event: str
    stage: str
    data: JsonMap
    timestamp_ms: int
    def __init__(self, event: _Optional[str] = ..., stage: _Optional[str] = ..., data: _Optional[_Union[JsonMap, _Mapping]] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class RunEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RunEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RunEvent, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("timestamp_ms",)
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    def __init__(self, timestamp_ms: _Optional[int] = ...) -> None: ...

class RunEnd(_message.Message):
    __slots__ = ("status", "message", "trace", "recorded_in")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_IN_FIELD_NUMBER: _ClassVar[int]
    status: RunEndStatus
    message: str
    trace: JsonMap
    recorded_in: str
    def __init__(self, status: _Optional[_Union[RunEndStatus, str]] = ..., message: _Optional[str] = ..., trace: _Optional[_Union[JsonMap, _Mapping]] = ..., recorded_in: _Optional[str] = ...) -> None: ...

class RunUpdate(_message.Message):
    __slots__ = ("event", "heartbeat", "result", "end", "events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: RunEvent
    heartbeat: Heartbeat
    result: GenerateResult
    end: RunEnd
    events: RunEvents
    def __init__(self, event: _Optional[_Union[RunEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., end: _Optional[_Union[RunEnd, _Mapping]] = ..., events: _Optional[_Union[RunEvents, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("found", "cancelled")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    found: bool
    cancelled: bool
    def __init__(self, found: _Optional[bool] = ..., cancelled: _Optional[bool] = ...) -> None: ...
