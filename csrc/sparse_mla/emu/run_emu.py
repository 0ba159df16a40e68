"""Run the CPU emulation of the sparse_mla CUDA kernels (emu_main.cpp) against
dsa_ext.reference. Build and run from the repository root:

  g++ -std=c++20 -O1 -pthread -shared -fPIC -Wno-unknown-pragmas \
      -Icsrc/sparse_mla/emu/shim -Icsrc -o /tmp/libsparse_mla_emu.so csrc/sparse_mla/emu/emu_main.cpp
  PYTHONPATH=$PWD python csrc/sparse_mla/emu/run_emu.py /tmp/libsparse_mla_emu.so
"""
import ctypes
import sys

import torch

from dsa_ext.reference import sparse_mla_bwd as ref_bwd
from dsa_ext.reference import sparse_mla_fwd as ref_fwd

lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "/tmp/libsparse_mla_emu.so")
P = ctypes.c_void_p
I64, I32, F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_float
lib.emu_fwd.argtypes = [P] * 7 + [I64, I64, I32, I32, F32]
lib.emu_bwd.argtypes = [P] * 10 + [I64, I64, I32, I32, F32, I32, I64] + [P] * 5


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def emu_fwd(q, kv, idx, scale, sink=None, tl=None):
    T, H, _ = q.shape
    out = torch.full((T, H, 512), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((T, H), float("nan"))
    lib.emu_fwd(ptr(q), ptr(kv), ptr(idx), ptr(sink), ptr(tl), ptr(out), ptr(lse), T,
                kv.shape[0], H, idx.shape[-1], scale)
    return out, lse


def emu_bwd(q, kv, out, dout, idx, lse, scale, sink=None, tl=None, det=False, chunk=1):
    T, H, D = q.shape
    S, K = kv.shape[0], idx.shape[-1]
    dq = torch.full_like(q, float("nan"))
    dkv = torch.zeros(S, D)
    hb = 64 if H % 64 == 0 else (32 if H % 32 == 0 else 16)
    scratch = torch.full(((H // hb) * chunk * K, D), float("nan"))
    ints = torch.zeros(chunk * K + 3 * (S + 1), dtype=torch.int32)
    lst, cnt, off, cur = ints[:chunk * K], ints[chunk * K:][:S + 1], ints[chunk * K + S + 1:][:S + 1], ints[chunk * K + 2 * (S + 1):]
    lib.emu_bwd(ptr(q), ptr(kv), ptr(out), ptr(dout), ptr(idx), ptr(lse), ptr(sink), ptr(tl),
                ptr(dq), ptr(dkv), T, S, H, K, scale, int(det), chunk, ptr(scratch), ptr(lst),
                ptr(cnt), ptr(off), ptr(cur))
    return dq, dkv.to(torch.bfloat16).view(S, 1, D)


def case(T, H, S, K, sink=False, tl=None, det=False, seed=0, adversarial=False):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(T, H, 576, generator=g)).bfloat16()
    kv = torch.randn(S, 1, 576, generator=g).bfloat16()
    idx = torch.randint(0, S, (T, 1, K), generator=g, dtype=torch.int32)
    idx[torch.rand(T, 1, K, generator=g) < 0.15] = -1
    if adversarial:
        idx[0, 0, ::5] = S + 3
        idx[-1, 0, :] = 5
    sk = torch.randn(H, generator=g) if sink else None
    tlt = torch.tensor(tl, dtype=torch.int32) if tl is not None else None
    scale = 576 ** -0.5
    out, lse = emu_fwd(q, kv, idx, scale, sk, tlt)
    r_out, r_lse = ref_fwd(q, kv, idx, scale, 512, sk, tlt)
    fin = torch.isfinite(r_lse)
    ok_lse = torch.equal(torch.isneginf(lse), torch.isneginf(r_lse)) and \
        torch.allclose(lse[fin], r_lse[fin], atol=1e-3)
    e_out = rel(out, r_out)
    dout = torch.randn(T, H, 512, generator=g).bfloat16()
    dq, dkv = emu_bwd(q, kv, out, dout, idx, lse, scale, sk, tlt, det, chunk=2)
    r_dq, r_dkv = ref_bwd(q, kv, out, dout, idx, lse, scale, 512, sk, tlt)
    e_dq, e_dkv = rel(dq, r_dq), rel(dkv, r_dkv)
    ok = e_out < 1e-2 and ok_lse and e_dq < 2e-2 and e_dkv < 2e-2 and not out.isnan().any()
    print(f"T={T} H={H} S={S} K={K} sink={sink} tl={tl} det={det}: out {e_out:.2e} "
          f"lse {'ok' if ok_lse else 'BAD'} dq {e_dq:.2e} dkv {e_dkv:.2e} -> {'PASS' if ok else 'FAIL'}",
          flush=True)
    return ok


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "quick":  # the pytest case: one per head block
        results = [
            case(2, 16, 90, 100, sink=True, tl=[100, 30], det=True, adversarial=True),
            case(1, 64, 120, 64, det=False),
        ]
        sys.exit(0 if all(results) else 1)
    results = [
        case(2, 16, 150, 100),
        case(3, 16, 90, 64, sink=True, tl=[64, 0, 30], det=True, adversarial=True),
        case(1, 32, 120, 128, sink=True),
        case(1, 64, 200, 70, det=True),
        case(1, 128, 100, 64, tl=[40]),
    ]
    sys.exit(0 if all(results) else 1)
