"""Shared test fixtures: seeded generators, the device matrix, and the CUDA skip.

Every test takes `device` from DEVICES: "cpu" always, "cuda" when a GPU is present (the CUDA
cases are marked `cuda` and skipped cleanly elsewhere). Inputs are random, never zeros.
"""
import pytest
import torch

import dsa_ext  # noqa: F401  (loads torch.ops.dsa)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def gen():
    """A fresh CPU generator with a fixed seed: draw on the CPU, then move, so CPU and CUDA
    runs of a test see the same inputs."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g


def randn(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| over finite entries, in float64 (METHOD.md)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def pytest_sessionfinish(session, exitstatus):
    """The emulator's per-kernel counters of this run (tests marked `emu`) go to
    build/emu/counters.json; `python tools/emu_counters.py` prints them."""
    import os
    import sys
    emulator = sys.modules.get("emulator")
    if emulator is not None:
        emulator.dump_counters(os.path.join(emulator.ROOT, "build", "emu", "counters.json"))
