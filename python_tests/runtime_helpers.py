"""Helpers shared by the runtime tests: seeded prompts, bounded polling and free ports."""
import socket
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


def sliding_window_models(num_layers: int = 4, window: int = 5) -> list:
    """A Mistral whose every layer slides over ``window`` positions and a Qwen2 whose layers after
    the second slide while the first two attend to everything (hybrid), tiny and seeded."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(15)
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128)
    return [MistralForCausalLM(MistralConfig(**common, sliding_window=window)).eval(),
            Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                         max_window_layers=2)).eval()]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (all held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
