"""Helpers shared by the runtime tests: seeded prompts and bounded polling."""
import time

import torch


def prompt(seed: int, length: int, vocab: int = 256) -> torch.Tensor:
    """Token ids ``[1, length]`` drawn from ``[0, vocab - 1)`` with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 1, (1, length), generator=g)


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes (the server frees sessions
    asynchronously); its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
