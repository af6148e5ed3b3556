import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no
# GPU; the switch is read when a kernel is decorated, so set it before any
# test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _cuda_context_left_usable(request):
    """On a GPU machine, a test that leaves an asynchronous CUDA error (a
    device-side assertion, a bad memory access) stops the run here, named,
    instead of every later test in the process failing for it."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError as e:  # the context is lost for the rest of the process
            pytest.exit(f"{request.node.nodeid} left the CUDA context unusable: {e}", returncode=1)
