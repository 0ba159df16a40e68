"""topk benchmark cases: `topk_indices` at SPEC section 6 shapes (k = 2048).

GPU: T in {1, 64, 4096} x S in {8K, 32K, 128K}, plus sorted output and `topk_slot_ids` at the
decode shape. CPU / quick: small shapes. Bytes = logits read once + indices written once.
Baselines: `torch.topk` and sort-based selection (`torch.sort` then the first k columns).

Cluster synchronisation (GPU only): the launcher reads DSA_TOPK_SYNC at every launch
(csrc/topk/topk_launch.cu), so each timed call sets it. `SYNC` (the CLI's `--sync`) picks
what is timed: "both" (the GPU default) times the mbarrier kernel as ours and the full-cluster-
barrier kernel beside it as the baseline "ours, DSA_TOPK_SYNC=cluster" (its speedup column is
cluster time / mbarrier time); "mbarrier" or "cluster" times that one kernel as ours. Below
sm_90 both modes run the same single-CTA kernel. On the CPU nothing changes (no such kernel).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .common import Case, with_env

__all__ = ["cases", "SYNC", "SYNC_CHOICES", "sync_variants", "with_sync"]

SYNC_CHOICES = ("both", "mbarrier", "cluster")
SYNC = "both"   # set by `dsa-bench --sync`
_ENV = "DSA_TOPK_SYNC"


def with_sync(mode: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with DSA_TOPK_SYNC=mode (restored after; the launcher reads it at every launch)."""
    return with_env(fn, _ENV, mode)


def sync_variants(device_type: str, sync: str) -> Tuple[Optional[str], List[str]]:
    """(the mode timed as ours or None for the launcher's default, [modes timed beside it])."""
    if sync not in SYNC_CHOICES:
        raise ValueError(f"topk sync must be one of {SYNC_CHOICES}, got {sync!r}")
    if device_type != "cuda":
        return None, []
    if sync == "both":
        return "mbarrier", ["cluster"]
    return sync, []


def _topk_case(device, T, S, k, sorted, gen) -> Case:
    import dsa_ext

    logits = torch.randn(T, S, generator=gen, dtype=torch.float32).to(device)
    name = "topk_indices_sorted" if sorted else "topk_indices"
    ours = lambda: dsa_ext.topk_indices(logits, k, sorted=sorted)  # noqa: E731
    mode, beside = sync_variants(device.type, SYNC)
    baselines = {f"ours, {_ENV}={m}": with_sync(m, ours) for m in beside}
    baselines["torch.topk"] = lambda: torch.topk(logits, k, dim=1, sorted=sorted)
    baselines["torch.sort[:k]"] = lambda: torch.sort(logits, dim=1, descending=True).indices[:, :k]
    return Case(
        family="topk", name=name, shape={"T": T, "S": S, "k": k},
        fn=with_sync(mode, ours) if mode else ours,
        bytes=float(T * S * 4 + T * k * 4), bound="memory", baselines=baselines,
        note="random normal logits, whole rows" + (f"; ours with {_ENV}={mode}" if mode else ""))


def _slot_ids_case(device, B, N, k, block_size, gen) -> Case:
    import dsa_ext

    S = 131072 if device.type == "cuda" else 8192
    idx = torch.randint(0, S, (B * N, k), generator=gen, dtype=torch.int32).to(device)
    blocks = S // block_size
    table = torch.randperm(B * blocks, generator=gen).reshape(B, blocks).int().to(device)

    def gathered():
        b = torch.arange(B * N, device=device) // N
        phys = table[b[:, None], (idx // block_size).long()]
        return phys * block_size + idx % block_size

    return Case(
        family="topk", name="topk_slot_ids", shape={"B": B, "N": N, "k": k, "block_size": block_size},
        fn=lambda: dsa_ext.topk_slot_ids(idx, table, block_size),
        bytes=float(B * N * k * 4 * 2 + B * N * k * 4), bound="memory",
        baselines={"torch gather": gathered},
        note="bytes: indices in, out, and one table entry per index")


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    out: List[Case] = []
    if device.type == "cuda" and not quick:
        for T in (1, 64, 4096):
            for S in (8192, 32768, 131072):
                out.append(_topk_case(device, T, S, 2048, False, gen))
        out.append(_topk_case(device, 64, 131072, 2048, True, gen))
        out.append(_topk_case(device, 4096, 131072, 2048, True, gen))
        out.append(_slot_ids_case(device, 64, 2, 2048, 64, gen))
    else:
        for T in (1, 16):
            for S in (8192, 32768):
                out.append(_topk_case(device, T, S, 2048, False, gen))
        out.append(_topk_case(device, 16, 32768, 2048, True, gen))
        out.append(_slot_ids_case(device, 8, 2, 2048, 64, gen))
    return out
