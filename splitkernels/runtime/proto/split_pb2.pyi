from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampling(_message.Message):
    __slots__ = ("do_sample", "temperature", "top_k", "top_p", "seed")
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("sampling", "fingerprint", "max_len", "codec_config")
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    CODEC_CONFIG_FIELD_NUMBER: _ClassVar[int]
    sampling: Sampling
    fingerprint: bytes
    max_len: int
    codec_config: bytes
    def __init__(self, sampling: _Optional[_Union[Sampling, _Mapping]] = ..., fingerprint: _Optional[bytes] = ..., max_len: _Optional[int] = ..., codec_config: _Optional[bytes] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_seq_len")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    max_seq_len: int
    def __init__(self, session_id: _Optional[int] = ..., max_seq_len: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("seq", "frame")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    frame: bytes
    def __init__(self, seq: _Optional[int] = ..., frame: _Optional[bytes] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("seq", "token", "position", "decode_s", "compute_s", "kv_bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    token: int
    position: int
    decode_s: float
    compute_s: float
    kv_bytes: int
    def __init__(self, seq: _Optional[int] = ..., token: _Optional[int] = ..., position: _Optional[int] = ..., decode_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Request(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    step: Step
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("opened", "token")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    token: Token
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
