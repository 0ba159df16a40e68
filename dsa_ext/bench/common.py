"""The contract between the op families' benchmark cases and the `dsa-bench` runner.

A family module `dsa_ext/bench/<family>.py` defines `cases(device: torch.device, quick: bool)
-> list[Case]`; the runner (`dsa_ext/bench/cli.py`) times each case's `fn` and `baselines`,
and prints time, TFLOP/s, GB/s and the fraction of the device's roofline. `quick` selects
small shapes (the CPU default). Inputs are built once, outside the timed callables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional


@dataclass
class Case:
    family: str                       # "indexer", "topk", "attn_fwd", "attn_bwd", "decode", "cache", "e2e"
    name: str                         # e.g. "indexer_logits"
    shape: Dict[str, int]             # the sizes that define the case, printed and stored in JSON
    fn: Callable[[], object]          # our op, inputs already bound
    flops: float = 0.0                # useful FLOPs (SPEC section 6 formulas), 0 when not compute-bound
    bytes: float = 0.0                # fewest bytes moved: each input read once, each output written once
    bound: str = "memory"             # "compute" | "memory": which roofline the fraction refers to
    flops_dtype: str = "bf16"         # "bf16" | "fp8" | "fp32": which peak the compute roofline uses
    baselines: Dict[str, Callable[[], object]] = field(default_factory=dict)  # what a user would run instead
    note: Optional[str] = None


def with_env(fn: Callable[[], object], name: str, value: str) -> Callable[[], object]:
    """fn run with environment variable `name` = value, restored after (also on raise). The
    kernel switches (DSA_SPARSE_MLA_FWD, DSA_MLA_DECODE_KERNEL, DSA_TOPK_SYNC, ...) are read by
    the glue or the launcher per call, so a case can time one kernel beside another, and under
    --graphs the kernel chosen at capture is the one the graph replays."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run
