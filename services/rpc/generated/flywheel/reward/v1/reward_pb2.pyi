from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("prompt", "completion", "prompt_token_ids", "completion_token_ids", "metadata")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_token_ids: _containers.RepeatedScalarFieldContainer[int]
    metadata: _struct_pb2.Struct
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completion_token_ids: _Optional[_Iterable[int]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "request_id")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    request_id: str
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class MemberScores(_message.Message):
    __slots__ = ("name", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("members", "aggregate", "aggregate_mode", "member_std", "api_version")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_MODE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_STD_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[MemberScores]
    aggregate: _containers.RepeatedScalarFieldContainer[float]
    aggregate_mode: str
    member_std: _containers.RepeatedScalarFieldContainer[float]
    api_version: str
    def __init__(self, members: _Optional[_Iterable[_Union[MemberScores, _Mapping]]] = ..., aggregate: _Optional[_Iterable[float]] = ..., aggregate_mode: _Optional[str] = ..., member_std: _Optional[_Iterable[float]] = ..., api_version: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "member_names", "aggregate_mode", "api_version")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthResponse.Status]
        SERVING: _ClassVar[HealthResponse.Status]
        NOT_SERVING: _ClassVar[HealthResponse.Status]
    STATUS_UNSPECIFIED: HealthResponse.Status
    SERVING: HealthResponse.Status
    NOT_SERVING: HealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_NAMES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_MODE_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.Status
    member_names: _containers.RepeatedScalarFieldContainer[str]
    aggregate_mode: str
    api_version: str
    def __init__(self, status: _Optional[_Union[HealthResponse.Status, str]] = ..., member_names: _Optional[_Iterable[str]] = ..., aggregate_mode: _Optional[str] = ..., api_version: _Optional[str] = ...) -> None: ...
