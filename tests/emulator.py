"""The CPU emulator of the CUDA kernels (csrc/emu), from Python: build a family's library,
run one of its entry points over torch tensors registered as device memory, collect the
emulator's hazard reports and counters. Used by tests/test_emu_*.py (marker `emu`).

    lib = emulator.load("indexer")
    reports = emulator.run(lib.emu_indexer_logits, q, k, ..., buffers=[q, k, out])
    assert reports == []
"""
import ctypes
import json
import os
import pathlib
import re
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
_LIBS = {}
# `full` mode (DSA_EMU_FULL=1) lets tests pick larger shapes.
FULL = os.environ.get("DSA_EMU_FULL", "0") == "1"


def load(family: str) -> ctypes.CDLL:
    """Builds (if its sources changed) and loads build/emu/libdsa_emu_FAMILY.so."""
    if family not in _LIBS:
        out = subprocess.run([sys.executable, str(ROOT / "csrc" / "emu" / "build.py"), family],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"emulator build of {family} failed:\n{out.stdout}{out.stderr}")
        lib = ctypes.CDLL(out.stdout.strip().splitlines()[-1])
        lib.emu_reports_json.restype = ctypes.c_char_p
        lib.emu_counters_json.restype = ctypes.c_char_p
        lib.emu_register_global.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        lib.emu_set_env.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        _LIBS[family] = lib
    return _LIBS[family]


def ptr(t):
    """The data pointer of a tensor (None -> NULL), for ctypes."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run(fn, *args, buffers=(), lib=None):
    """Calls fn(*args) with every tensor of `buffers` registered as device memory (accesses
    anywhere else are out-of-bounds reports); returns the reports of this call (dicts with
    kind, kernel, text) and fn's return value as (reports, result)."""
    lib = lib or _owner(fn)
    lib.emu_clear_reports()
    lib.emu_clear_globals()
    for i, t in enumerate(buffers):
        if t is not None and t.numel():
            lib.emu_register_global(t.data_ptr(), t.numel() * t.element_size(), f"buffer{i}".encode())
    try:
        result = fn(*args)
    finally:
        lib.emu_clear_globals()
    return _with_source_lines(json.loads(lib.emu_reports_json().decode())), result


_PLACE = re.compile(r"(/\S+\.so)\+(0x[0-9a-f]+)")


def _with_source_lines(reports):
    """Appends function, file:line to each report's `lib.so+0xoffset` place (addr2line)."""
    for r in reports:
        m = _PLACE.search(r["text"])
        if not m:
            continue
        try:
            out = subprocess.run(["addr2line", "-C", "-f", "-e", m.group(1), m.group(2)],
                                 capture_output=True, text=True, timeout=20).stdout.split("\n")
            if len(out) >= 2 and not out[1].startswith("??"):
                r["text"] += f" [{out[0][:120]} at {out[1]}]"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return reports


def set_env(lib, name, value):
    """Sets (value str) or clears (None) an environment switch the launchers read."""
    lib.emu_set_env(name.encode(), None if value is None else str(value).encode())


def counters(lib):
    """Per-kernel counters accumulated since the last clear: launches, ctas, threads,
    smem_requests / smem_wavefronts, gmem_requests / gmem_sectors, bytes, mma/wgmma/ldmatrix."""
    return json.loads(lib.emu_counters_json().decode())


def _owner(fn):
    for lib in _LIBS.values():
        try:
            if ctypes.cast(fn, ctypes.c_void_p).value == ctypes.cast(getattr(lib, fn.__name__), ctypes.c_void_p).value:
                return lib
        except (AttributeError, TypeError):
            continue
    raise ValueError("pass lib= for a function not loaded through emulator.load")


def dump_counters(path):
    """Writes every loaded family's counters to `path` (JSON: family -> kernel -> counters);
    called at the end of a pytest session (conftest.py), read by tools/emu_counters.py."""
    if not _LIBS:
        return
    data = {fam: counters(lib) for fam, lib in _LIBS.items()}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
