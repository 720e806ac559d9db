"""Run the Triton kernels through the interpreter when there is no CUDA device. TRITON_INTERPRET must be set
before any @triton.jit function is defined, so before fused_attn is imported anywhere in the session."""
import os
import socket

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fused_attn  # noqa: E402,F401  (imported once here, after the environment is settled)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on the loopback interface (for servers and process groups)."""
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port
