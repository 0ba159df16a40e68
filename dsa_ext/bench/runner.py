"""Timing, rooflines and reporting for `dsa-bench` (the CLI is dsa_ext/bench/cli.py).

Timing: warm-up calls, then timed calls until they add up to `budget_s` (at least `min_reps`,
at most `max_reps`); the median is reported. On the CPU a case and its baselines are timed in
interleaved rounds (one call of each per round), so that load from other processes falls on
all of them alike and the ratios printed hold. On CUDA each
call is timed with CUDA events (with `graphs`, calls under GRAPH_BELOW_S are captured once
into a CUDA graph and the replay is timed: launch overhead would dominate them); on the CPU
with time.perf_counter. Caches are not flushed between
calls.

Rooflines: datasheet peaks for the GPUs SPEC section 6 targets (dense tensor-core rates, no
sparsity), otherwise measured at start-up: the bandwidth of a large copy and the matmul rate
per dtype. A CPU has no FP8 math, so its FP8 peak is its measured bf16 matmul rate.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .common import Case

__all__ = ["Roofline", "DATASHEET_ROOFLINES", "detect_roofline", "measure_roofline", "TimingOptions",
           "time_callable", "run_case", "error_text", "format_table", "format_shape", "progress"]


# ---------------------------------------------------------------- rooflines

@dataclass(frozen=True)
class Roofline:
    name: str
    bf16_tflops: float
    fp8_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    source: str            # "datasheet" or how it was measured

    def peak_flops(self, dtype: str) -> float:
        return {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "fp32": self.fp32_tflops}[dtype] * 1e12

    def describe(self) -> str:
        return (f"{self.name}: {self.bf16_tflops:.4g} bf16 / {self.fp8_tflops:.4g} fp8 / {self.fp32_tflops:.4g} fp32 "
                f"TFLOP/s, {self.bandwidth_gbs:.4g} GB/s ({self.source})")


# Dense (non-sparse) tensor-core peaks from the vendor datasheets; fp32 is the non-tensor rate.
# H800 SXM has the H100 SXM's SMs, clocks and HBM.
DATASHEET_ROOFLINES = {
    "H100 SXM": Roofline("H100 SXM", 989.0, 1979.0, 67.0, 3350.0, "datasheet"),
    "H800 SXM": Roofline("H800 SXM", 989.0, 1979.0, 67.0, 3350.0, "datasheet"),
    "H200": Roofline("H200", 989.0, 1979.0, 67.0, 4800.0, "datasheet"),
}


def _datasheet_for(gpu_name: str) -> Optional[Roofline]:
    name = gpu_name.upper()
    if "H200" in name:
        return DATASHEET_ROOFLINES["H200"]
    if ("H100" in name or "H800" in name) and "PCIE" not in name:   # SXM / HBM3 parts
        return DATASHEET_ROOFLINES["H800 SXM" if "H800" in name else "H100 SXM"]
    return None


def detect_roofline(device: torch.device) -> Roofline:
    """The datasheet roofline of a known GPU, else a measured one."""
    if device.type == "cuda":
        known = _datasheet_for(torch.cuda.get_device_name(device))
        if known is not None:
            return known
    return measure_roofline(device)


def measure_roofline(device: torch.device) -> Roofline:
    """Measure copy bandwidth (read + write bytes) and matmul rates on `device` (about a second)."""
    big = device.type == "cuda"
    copy_elems = (256 if big else 32) * 2**20 // 4
    src = torch.empty(copy_elems, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    opts = TimingOptions(budget_s=0.1, min_reps=3, max_reps=50)
    copy_s = time_callable(lambda: dst.copy_(src), device, opts).median_s
    rates = {}
    n = 8192 if big else 768
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        rates[dtype] = 2 * n**3 / time_callable(lambda: a @ b, device, opts).median_s / 1e12
    name = torch.cuda.get_device_name(device) if big else cpu_model()
    threads = "" if big else f", {torch.get_num_threads()} threads"
    return Roofline(name, rates[torch.bfloat16], rates[torch.bfloat16], rates[torch.float32],
                    2 * src.nbytes / copy_s / 1e9,
                    f"measured: {src.nbytes >> 20} MiB copy, {n}^3 matmuls{threads}"
                    + ("" if big else "; no FP8 math, fp8 = bf16 rate"))


def cpu_model() -> str:
    """The CPU's model name and whether it has the fast bf16 GEMMs (AMX or AVX512-BF16) that
    the CPU kernels use when oneDNN offers them (else fp32 GEMMs, common/cpu_gemm.h)."""
    model, flags = "CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}" + (f", {'+'.join(bf16)})" if bf16 else ")")


# ---------------------------------------------------------------- timing

# With --graphs, only calls shorter than this are replayed from a CUDA graph: that is where
# launch overhead matters, and long multi-kernel workloads would only cost capture memory.
GRAPH_BELOW_S = 2e-3


@dataclass
class TimingOptions:
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 100
    budget_s: float = 0.5        # wall time to aim for per timed callable
    graphs: bool = False         # CUDA graphs (CUDA only) for calls shorter than GRAPH_BELOW_S


@dataclass
class Timing:
    median_s: float
    reps: int
    graphed: bool


def _cuda_graph_of(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture one call of fn (already warmed up) into a CUDA graph; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                    # allocations of the first call happen off-graph
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_callable(fn: Callable[[], object], device: torch.device, opts: TimingOptions) -> Timing:
    """Median seconds per call of fn (see the module docstring)."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # Warm-up calls, timed by the wall clock: the last one decides whether a graph is worth it.
    warm_s = 0.0
    for _ in range(max(opts.warmup, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        warm_s = time.perf_counter() - start
    graphed = False
    if cuda and opts.graphs and warm_s < GRAPH_BELOW_S:
        try:
            fn, graphed = _cuda_graph_of(fn), True
        except Exception:  # not capturable (host sync, allocation policy): time it eagerly
            sync()

    if cuda:
        def timed_once() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed_once() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

    samples: List[float] = []
    while len(samples) < opts.max_reps and (len(samples) < opts.min_reps or sum(samples) < opts.budget_s):
        samples.append(timed_once())
    return Timing(statistics.median(samples), len(samples), graphed)


# ---------------------------------------------------------------- one case -> one row

def error_text(exc: BaseException) -> str:
    """The exception's type and first sentence (dispatcher errors run on for a paragraph)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 120 and ". " in first:
        first = first[: first.index(". ") + 1]
    return f"{type(exc).__name__}: {first}"[:300]


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def time_interleaved(fns: Dict[str, Callable[[], object]], opts: TimingOptions) -> Dict[str, object]:
    """CPU: median seconds of several callables timed in rounds (one call of each per round), so
    that other processes' load falls on all of them alike and their ratios hold. Rounds run
    until every callable has `budget_s` of samples (at least `min_reps`, at most `max_reps`).
    Returns name -> Timing, or the exception a call raised."""
    result: Dict[str, object] = {}
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(opts.warmup, 1)):
                fn()
            live[name] = (fn, [])
        except Exception as exc:
            result[name] = exc
    rounds = 0
    while live and rounds < opts.max_reps and (
            rounds < opts.min_reps or min(sum(v[1]) for v in live.values()) < opts.budget_s):
        for name in list(live):
            fn, samples = live[name]
            try:
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            except Exception as exc:
                result[name] = exc
                del live[name]
        rounds += 1
    for name, (_, samples) in live.items():
        result[name] = Timing(statistics.median(samples), len(samples), False)
    return result


def run_case(case: Case, device: torch.device, roofline: Roofline, opts: TimingOptions) -> dict:
    """Time a case and its baselines; never raises (a failure becomes the row's `error`). On the
    CPU they are timed interleaved (time_interleaved), on CUDA one after the other."""
    row = {
        "family": case.family, "name": case.name, "shape": dict(case.shape), "status": "ok",
        "ours_us": None, "reps": None, "graphed": False, "tflops": None, "gbs": None,
        "roofline_fraction": None, "bound": case.bound, "flops_dtype": case.flops_dtype,
        "flops": case.flops, "bytes": case.bytes, "baselines": {}, "note": case.note, "error": None,
    }
    ours_key = object()   # a name no baseline has
    timed: Dict[object, object] = {}
    if device.type != "cuda":
        timed = time_interleaved({ours_key: case.fn, **case.baselines}, opts)

    def timing_of(key, fn) -> Timing:
        if device.type != "cuda":
            t = timed[key]
            if isinstance(t, BaseException):
                raise t
            return t
        return time_callable(fn, device, opts)

    try:
        timing = timing_of(ours_key, case.fn)
    except Exception as exc:  # an op that has not landed, a bad case, out of memory: report, go on
        row.update(status="error", error=error_text(exc))
        _free_device_memory(device)
    else:
        seconds = timing.median_s
        row.update(ours_us=seconds * 1e6, reps=timing.reps, graphed=timing.graphed)
        if case.flops > 0:
            row["tflops"] = case.flops / seconds / 1e12
        if case.bytes > 0:
            row["gbs"] = case.bytes / seconds / 1e9
        if case.bound == "compute" and case.flops > 0:
            row["roofline_fraction"] = case.flops / seconds / roofline.peak_flops(case.flops_dtype)
        elif case.bound == "memory" and case.bytes > 0:
            row["roofline_fraction"] = case.bytes / seconds / (roofline.bandwidth_gbs * 1e9)
    for name, fn in case.baselines.items():
        entry = {"us": None, "speedup": None, "error": None}
        try:
            entry["us"] = timing_of(name, fn).median_s * 1e6
        except Exception as exc:
            entry["error"] = error_text(exc)
            _free_device_memory(device)
        if entry["us"] and row["ours_us"]:
            entry["speedup"] = entry["us"] / row["ours_us"]
        row["baselines"][name] = entry
    _free_device_memory(device)
    return row


# ---------------------------------------------------------------- printing

def format_shape(shape: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _rate(value: Optional[float]) -> str:
    """Three significant digits below 100 (small CPU rates stay readable), whole numbers above."""
    return _num(value, ".3g" if value is not None and value < 100 else ".0f")


def _baseline_text(row: dict) -> str:
    parts = []
    for name, b in row["baselines"].items():
        if b["error"]:
            parts.append(f"{name}: error")
        elif b["speedup"] is not None:
            parts.append(f"{name} {b['us']:.1f} ({b['speedup']:.2f}x)")
        else:
            parts.append(f"{name} {_num(b['us'], '.1f')}")
    return "; ".join(parts)


TABLE_COLUMNS = ("case", "shape", "ours us", "TFLOP/s", "GB/s", "% roof", "baselines: us (our speedup)")


def format_table(rows: List[dict]) -> str:
    """The result table; error rows carry their message in the last column."""
    cells = []
    for r in rows:
        frac = None if r["roofline_fraction"] is None else 100 * r["roofline_fraction"]
        ours = _num(r["ours_us"], ".1f") + ("*" if r.get("graphed") else "")
        last = f"ERROR {r['error']}" if r["status"] == "error" else _baseline_text(r)
        if r["status"] == "error" and r["baselines"]:
            last += " | " + _baseline_text(r)
        cells.append((f"{r['family']}/{r['name']}", format_shape(r["shape"]), ours, _rate(r["tflops"]),
                      _rate(r["gbs"]), _rate(frac), last))
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(TABLE_COLUMNS[:-1])]
    numeric = {2, 3, 4, 5}

    def line(values):
        out = [v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(out + [values[-1]]).rstrip()

    sep = "  ".join("-" * w for w in widths) + "  " + "-" * len(TABLE_COLUMNS[-1])
    lines = [line(TABLE_COLUMNS), sep] + [line(c) for c in cells]
    if any(r.get("graphed") for r in rows):
        lines.append("* timed as a CUDA graph replay")
    return "\n".join(lines)


def progress(index: int, total: int, row: dict, stream=sys.stderr) -> None:
    """One line per finished case."""
    what = f"{row['family']}/{row['name']} {format_shape(row['shape'])}"
    result = f"ERROR {row['error']}" if row["status"] == "error" else f"{row['ours_us']:.1f} us"
    print(f"[{index}/{total}] {what}: {result}", file=stream, flush=True)
