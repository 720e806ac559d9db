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


# CPython 3.11 keeps frames in 16 KB "data stack" chunks and frees a chunk as soon as the frame that opened it
# returns: a hot loop whose call depth crosses a chunk boundary maps and unmaps one per call (the interpreted
# kernels then ran up to 2x slower under pytest than alone, depending on where its frames happened to start).
# Each test runs on top of one large frame, which makes CPython open a chunk twice its size: the test's frames
# then start in a fresh 64 KB of room that stays mapped until the test returns.
_ROOM = 8192  # slots (8 bytes each) of the padding frame
exec("def _padded_call(fn):\n    " + " = ".join(f"_{i}" for i in range(_ROOM)) + " = None\n    return fn()\n")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    _padded_call(lambda: pyfuncitem.obj(**args))  # noqa: F821 (defined by the exec above)
    return True


@pytest.fixture(autouse=True)
def _fresh_replays():
    """Each test starts with no recorded attention / flex_attention call (fused_attn/replay.py): a test that
    patches a kernel table or a limit sees its own calls checked."""
    fused_attn.replay.clear()


def pytest_collection_modifyitems(items):
    """The compile-time gate's file first (stable otherwise): under `-n 2` its worker starts the longest test --
    two compiler processes of its own -- while the other worker runs the rest of the suite beside it."""
    items.sort(key=lambda item: item.path.name != "test_compile.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`-n 2`): whole files per worker (module-scoped fixtures, e.g. the distributed tests' process
    groups, run once), taken in collection order (the gate first) rather than xdist's largest-file-first."""
    from xdist.scheduler import LoadFileScheduling
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
