"""Split runtime: edge and server segments with their KV caches, the codec between them,
sessions, in-process and gRPC transports, a link emulator, speculative decoding across the
split, and measurements."""
from .adapters import Adapter, adapter_for, register_adapter, supported_families
from .link import LinkEmulator
from .metrics import GenerationMetrics, StepMetrics
from .protocol import SamplingParams, SplitError, Status
from .resume import ResumingTransport, RetryPolicy
from .segments import Edge, Server
from .sessions import Limits, SessionManager
from .speculative import SpeculativeResult, generate_speculative, speculate
from .split_model import GenerationResult, SplitConfig, SplitModel, generate_split, model_fingerprint, split_model
from .transport import Exchange, InProcessTransport, SessionHandle, Transport

__all__ = [
    "Adapter", "adapter_for", "register_adapter", "supported_families", "LinkEmulator", "GenerationMetrics",
    "StepMetrics", "SamplingParams", "SplitError", "Status", "Edge", "Server", "Limits", "SessionManager",
    "GenerationResult", "SplitConfig", "SplitModel", "generate_split", "model_fingerprint", "split_model", "Exchange",
    "InProcessTransport", "SessionHandle", "Transport", "ResumingTransport", "RetryPolicy", "SpeculativeResult",
    "generate_speculative", "speculate",
]
