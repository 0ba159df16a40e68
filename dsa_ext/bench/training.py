"""Benchmark cases of the training ops (family "train", SPEC section 7): the indexer backward
(`indexer_train_logits_bwd`) and both KL alignment losses (`indexer_kl_loss_sparse`,
`indexer_kl_loss_dense`, each returning the loss and its gradients into q, k, w).

Baselines: the PyTorch composite a user would otherwise write (autograd through einsum, relu,
log_softmax and the KL sum; it materialises [T, H, S] for the indexer, and [T, S] plus
[T, Hm, S] for the dense loss). Each case's note gives the peak extra memory of our op and of
the composite, measured once before timing (CUDA: max_memory_allocated growth; CPU: peak RSS
growth through /proc/self/clear_refs where Linux has it).

FLOPs per (query, key) pair in range: the indexer forward 2*H*D, its backward 4*H*D (dq and
dk), the main attention's scores 2*Hm*d (dense loss only; recomputation not counted).
CUDA shapes: T=4096, S=8192, H=64, D=128 (indexer backward, sparse loss with K=2048) and the
last T=512 queries of a 128K context with Hm=128, d=576 (dense loss, where the composite's
[T, Hm, S] fp32 scores alone are 34 GB). CPU / quick: small shapes, well under a second.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch

from .common import Case

__all__ = ["cases", "peak_memory_bytes"]


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(name)


def _mmap_large_allocations() -> None:
    """Make glibc serve every allocation >= 64 KiB by mmap (fixed threshold): freed buffers
    leave the RSS at once, so a later peak is not hidden by pages an earlier run left
    resident in the heap (glibc's dynamic threshold would otherwise grow to 32 MiB)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory fn adds while it runs (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _mmap_large_allocations()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS
    base = _rss_field("VmRSS")
    fn()
    return _rss_field("VmHWM") - base


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _memory_note(ours, composite, device, what: str) -> str:
    def measure(fn):
        try:
            return _mib(peak_memory_bytes(fn, device))
        except torch.OutOfMemoryError:
            return "out of memory"
        except RuntimeError as exc:  # CPU allocation failure
            return f"failed ({str(exc).splitlines()[0][:60]})"
    return f"{what}; peak extra memory: ours {measure(ours)}, composite {measure(composite)}"


# ---- the PyTorch composites ---------------------------------------------------------------------

def _range_mask(ks, ke, S):
    s = torch.arange(S, device=ks.device)
    return (s[None, :] >= ks[:, None].long()) & (s[None, :] < ke[:, None].long())


def _composite_logits(q, k, w):
    return torch.einsum("th,ths->ts", w, torch.relu(torch.einsum("thd,sd->ths", q, k)))


def _leaves(*xs):
    return [x.detach().requires_grad_(True) for x in xs]


def _composite_logits_bwd(grad, q, k, w, mask):
    q, k, w = _leaves(q, k, w)
    _composite_logits(q, k, w).backward(torch.where(mask, grad, 0.0))
    return q.grad, k.grad, w.grad


def _masked_kl(logits, p, mask):
    log_r = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    safe = torch.where(mask & (p > 0), p, 1.0)
    return torch.where(mask & (p > 0), p * (torch.log(safe) - log_r), 0.0).sum()


def _composite_sparse_loss(q, k, w, idx, target, valid):
    q, k, w = _leaves(q, k, w)
    rows = k[torch.where(valid, idx[:, 0].long(), 0)]                     # [T, K, D]
    logits = torch.einsum("th,thk->tk", w, torch.relu(torch.einsum("thd,tkd->thk", q, rows)))
    loss = _masked_kl(logits, target, valid)
    loss.backward()
    return loss, q.grad, k.grad, w.grad


def _composite_dense_loss(q, k, w, mask, q_main, kv_main, sm_scale):
    q, k, w = _leaves(q, k, w)
    with torch.no_grad():
        scores = torch.einsum("thd,sd->ths", q_main, kv_main[:, 0]) * sm_scale  # [T, Hm, S]
        p = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1).mean(1)
    loss = _masked_kl(_composite_logits(q, k, w), p, mask)
    loss.backward()
    return loss, q.grad, k.grad, w.grad


# ---- cases --------------------------------------------------------------------------------------

def _indexer_inputs(device, dtype, T, H, D, S, gen):
    q = (torch.randn(T, H, D, generator=gen) * D ** -0.5).to(dtype).to(device)
    k = torch.randn(S, D, generator=gen).to(dtype).to(device)
    w = torch.randn(T, H, generator=gen).to(device)   # fp32 head weights
    return q, k, w


def _causal_tail(T, S, device):
    """The last T queries of an S-token context: query t sees [0, S - T + t + 1)."""
    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32, device=device)
    return torch.zeros_like(ke), ke


def _logits_bwd_case(device, dtype, T, H, D, S, gen) -> Case:
    import dsa_ext

    q, k, w = _indexer_inputs(device, dtype, T, H, D, S, gen)
    ks, ke = _causal_tail(T, S, device)
    mask = _range_mask(ks, ke, S)
    grad = torch.randn(T, S, generator=gen).to(device)
    pairs = float(mask.sum())
    ours = lambda: dsa_ext.indexer_train_logits_bwd(grad, q, k, w, ks, ke)  # noqa: E731
    composite = lambda: _composite_logits_bwd(grad, q, k, w, mask)        # noqa: E731
    nbytes = (q.numel() * 2 + k.numel() * 2) * q.element_size() + w.numel() * 8 + grad.numel() * 4
    return Case(family="train", name="indexer_train_logits_bwd",
                shape={"T": T, "S": S, "H": H, "D": D}, fn=ours,
                flops=6.0 * H * D * pairs, bytes=float(nbytes), bound="compute",
                flops_dtype="bf16" if device.type == "cuda" else "fp32",
                baselines={"torch autograd composite": composite},
                note=_memory_note(ours, composite, device, "causal tail; FLOPs 6*H*D per pair"))


def _sparse_loss_case(device, dtype, T, H, D, S, K, gen) -> Case:
    import dsa_ext

    q, k, w = _indexer_inputs(device, dtype, T, H, D, S, gen)
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32).to(device)
    target = torch.rand(T, K, generator=gen)
    target = (target / target.sum(1, keepdim=True)).to(device)
    valid = torch.ones(T, K, dtype=torch.bool, device=device)
    ours = lambda: dsa_ext.indexer_kl_loss_sparse_with_grads(q, k, w, idx, target)  # noqa: E731
    composite = lambda: _composite_sparse_loss(q, k, w, idx, target, valid)       # noqa: E731
    nbytes = ((q.numel() * 2 + k.numel() * 2) * q.element_size() + w.numel() * 8
              + idx.numel() * 4 + target.numel() * 4)
    return Case(family="train", name="indexer_kl_loss_sparse",
                shape={"T": T, "S": S, "K": K, "H": H, "D": D}, fn=ours,
                flops=6.0 * H * D * T * K, bytes=float(nbytes), bound="compute",
                flops_dtype="bf16" if device.type == "cuda" else "fp32",
                baselines={"torch autograd composite": composite},
                note=_memory_note(ours, composite, device,
                                  "random indices, all valid; loss + dq, dk, dw"))


def _dense_loss_case(device, dtype, T, H, D, S, Hm, Dm, gen) -> Case:
    import dsa_ext

    q, k, w = _indexer_inputs(device, dtype, T, H, D, S, gen)
    q_main = (torch.randn(T, Hm, Dm, generator=gen)).to(dtype).to(device)
    kv_main = torch.randn(S, 1, Dm, generator=gen).to(dtype).to(device)
    ks, ke = _causal_tail(T, S, device)
    mask = _range_mask(ks, ke, S)
    sm = Dm ** -0.5
    pairs = float(mask.sum())
    ours = lambda: dsa_ext.indexer_kl_loss_dense_with_grads(q, k, w, ks, ke, q_main, kv_main, sm)  # noqa: E731
    composite = lambda: _composite_dense_loss(q, k, w, mask, q_main, kv_main, sm)              # noqa: E731
    nbytes = ((q.numel() * 2 + k.numel() * 2 + q_main.numel() + kv_main.numel()) * q.element_size()
              + w.numel() * 8)
    return Case(family="train", name="indexer_kl_loss_dense",
                shape={"T": T, "S": S, "H": H, "D": D, "Hm": Hm, "d": Dm}, fn=ours,
                flops=(6.0 * H * D + 2.0 * Hm * Dm) * pairs, bytes=float(nbytes), bound="compute",
                flops_dtype="bf16" if device.type == "cuda" else "fp32",
                baselines={"torch autograd composite ([T,S] + [T,Hm,S])": composite},
                note=_memory_note(ours, composite, device,
                                  "causal tail; loss + dq, dk, dw; recomputation not counted"))


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda" and not quick:
        bf16 = torch.bfloat16
        return [
            _logits_bwd_case(device, bf16, 4096, 64, 128, 8192, gen),
            _sparse_loss_case(device, bf16, 4096, 64, 128, 8192, 2048, gen),
            _dense_loss_case(device, bf16, 512, 64, 128, 131072, 128, 576, gen),
        ]
    dtype = torch.float32
    return [
        _logits_bwd_case(device, dtype, 64, 8, 64, 1024, gen),
        _sparse_loss_case(device, dtype, 64, 8, 64, 1024, 128, gen),
        _dense_loss_case(device, dtype, 32, 4, 32, 4096, 4, 64, gen),
    ]
