#!/usr/bin/env python3
"""Model of sparse_mla_wgmma.cuh (the sm_90a wgmma forward kernel) in numpy, run on the CPU.

No GPU is needed: the kernel's shared-memory byte layout, every wgmma descriptor it builds
(start address, LBO, SBO, swizzle bits, the per-k-step address increments) and the way its
threads read the accumulator fragments are replayed on a byte array, with wgmma itself modelled
from its documented semantics:

- operand layouts: the canonical no-swizzle ("INTERLEAVE") forms of CUTLASS `make_gmma_desc`
  (cute/atom/mma_traits_sm90_gmma.hpp), in elements of T = 8 bf16 per 16 bytes:
    K-major  : ((8, m), (T, 2k)) : ((T, SBO), (1, LBO))   -- rows 16 B apart, 8-row groups SBO
    MN-major : ((T, 1, m), (8, k)) : ((1, T, SBO), (T, LBO))  -- MN groups SBO, 8-k groups LBO
- descriptor bits (PTX 9.7.15.5.1.2.2): 13-0 start >> 4, 29-16 LBO >> 4, 45-32 SBO >> 4,
  63-62 swizzle (0 = none);
- accumulator fragment (PTX figure wgmma-64nN-d; KERNELS.md section 6): thread t of the
  warpgroup, value i: row = 16 (t / 32) + 8 ((i % 4) >= 2) + (t % 32) / 4,
  col = 8 (i / 4) + 2 (t % 4) + (i & 1).

The kernel's own index expressions (gather/Q thread mapping, core_byte_offset, row0 / c4 of
the softmax and epilogue, the P stores) are transcribed below; a change to the kernel must be
mirrored here. The model runs a whole CTA (several 64-token blocks, skipped indices, a
topk_length limit, attn_sink) and compares out / lse with a float64 reference, and it checks
that the Q, KV and P tiles are each written exactly once per element and that descriptor
arithmetic never carries out of its 14-bit fields; a table of the kernel's per-phase shared-memory
accesses checks that its two barriers per block separate every cross-warpgroup write. Exit status 0 on success. Takes ~2 s.
"""
from __future__ import annotations

import sys

import numpy as np

# ---- constants of WgmmaFwdCfg / sparse_mla_kernels.cuh --------------------------------------
DQK, DV = 576, 512
QK_CHUNKS = DQK // 8
HB, BN, THREADS = 64, 64, 256
ROW_GROUP_BYTES = 128
COL_GROUP_BYTES = 64 * 16
Q_BYTES = HB * DQK * 2
KV_BYTES = BN * DQK * 2
P_BYTES = HB * BN * 2
Q_OFF = 0
KV_OFF = Q_OFF + Q_BYTES
P_OFF = KV_OFF + 2 * KV_BYTES
ALPHA_OFF = P_OFF + P_BYTES
SUM_OFF = ALPHA_OFF + HB * 4
VALID_OFF = SUM_OFF + HB * 4
SMEM_BYTES = VALID_OFF + 2 * BN * 4
MAX_SMEM = 232448
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_INIT = np.float32(-1e30)
# Dynamic shared memory does not start at address 0 in the shared window; model a base offset so
# descriptor start-address arithmetic is exercised with realistic (non-zero) addresses.
SMEM_BASE = 0x400


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bf16, returned as the uint16 bit patterns."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = b + 0x7FFF + ((b >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def core_byte_offset(R: int, r, c):
    """sparse_mla_wgmma.cuh core_byte_offset<R>(r, c)."""
    r = np.asarray(r)
    c = np.asarray(c)
    return (c >> 3) * (R * 16) + (r >> 3) * 128 + (r & 7) * 16 + (c & 7) * 2


def wgmma_desc(addr: int, lbo: int, sbo: int) -> int:
    """common/wgmma_sm90.cuh wgmma_desc (no swizzle)."""
    return (((addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16) |
            (((sbo >> 4) & 0x3FFF) << 32)) & 0xFFFFFFFFFFFFFFFF


def desc_fields(desc: int):
    assert desc >> 64 == 0
    start = (desc & 0x3FFF) << 4
    assert (desc >> 14) & 0x3 == 0, "start address carried out of its 14-bit field"
    lbo = ((desc >> 16) & 0x3FFF) << 4
    assert (desc >> 30) & 0x3 == 0, "LBO carried out of its field"
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 46) == 0, "SBO carried out of its field, or base offset / swizzle bits set"
    return start, lbo, sbo


class Smem:
    def __init__(self):
        self.mem = np.zeros(SMEM_BASE + SMEM_BYTES, dtype=np.uint8)

    def addr(self, off: int) -> int:
        return SMEM_BASE + off

    def write_bf16(self, addr, vals_u16):
        addr = np.asarray(addr).ravel()
        v = np.asarray(vals_u16, dtype=np.uint16).ravel()
        assert np.all(addr % 2 == 0) and np.all(addr + 2 <= self.mem.size)
        self.mem[addr] = (v & 0xFF).astype(np.uint8)
        self.mem[addr + 1] = (v >> 8).astype(np.uint8)

    def read_bf16(self, addr) -> np.ndarray:
        addr = np.asarray(addr)
        assert np.all(addr % 2 == 0) and np.all(addr + 2 <= self.mem.size) and np.all(addr >= 0)
        u = self.mem[addr].astype(np.uint16) | (self.mem[addr + 1].astype(np.uint16) << 8)
        return bf16_to_f32(u)

    def write_f32(self, off, vals):
        a = SMEM_BASE + np.asarray(off)
        b = np.asarray(vals, dtype=np.float32).view(np.uint8).reshape(-1, 4)
        for k in range(4):
            self.mem[a + k] = b[:, k]

    def read_f32(self, off):
        a = SMEM_BASE + np.asarray(off).ravel()
        b = np.stack([self.mem[a + k] for k in range(4)], axis=1).copy()
        return b.view(np.float32).ravel()


# ---- wgmma, from its documented semantics -----------------------------------------------------
def operand_kmajor(sm: Smem, desc: int, rows: int) -> np.ndarray:
    """[rows x 16] operand, K-major no-swizzle: ((8,m),(T,2)) : ((T,SBO),(1,LBO))."""
    start, lbo, sbo = desc_fields(desc)
    m = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (m % 8) * 16 + (m // 8) * sbo + (k % 8) * 2 + (k // 8) * lbo
    return sm.read_bf16(addr)


def operand_mnmajor(sm: Smem, desc: int, cols: int) -> np.ndarray:
    """[16 x cols] operand B[k][n], MN-major no-swizzle: ((T,1,m),(8,k)) : ((1,T,SBO),(T,LBO))."""
    start, lbo, sbo = desc_fields(desc)
    k = np.arange(16)[:, None]
    n = np.arange(cols)[None, :]
    addr = start + (n % 8) * 2 + (n // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo
    return sm.read_bf16(addr)


FRAG_T = np.arange(128)[:, None]


def frag_rows_cols(n: int):
    i = np.arange(n // 2)[None, :]
    row = 16 * (FRAG_T // 32) + 8 * ((i % 4) >= 2) + (FRAG_T % 32) // 4
    col = 8 * (i // 4) + 2 * (FRAG_T % 4) + (i & 1)
    return row, col


def wgmma(acc: np.ndarray, sm: Smem, desc_a: int, desc_b: int, n: int, tnsp_b: bool, scale_d: bool):
    """acc [128 threads, n/2] fp32 fragments; D = A[64x16] B[16xn] (+ acc)."""
    a = operand_kmajor(sm, desc_a, 64).astype(np.float64)
    b = operand_mnmajor(sm, desc_b, n) if tnsp_b else operand_kmajor(sm, desc_b, n).T
    d = a @ b.astype(np.float64)
    row, col = frag_rows_cols(n)
    add = d[row, col].astype(np.float32)
    return (acc + add if scale_d else add).astype(np.float32)


# ---- the kernel, transcribed ------------------------------------------------------------------
def entry_row(idx_row, j, limit, S):
    j = np.asarray(j)
    r = np.where(j < limit, idx_row[np.minimum(j, len(idx_row) - 1)], -1).astype(np.int64)
    return np.where((r >= 0) & (r < S), r, -1)


def gather_rows_plan(nthreads_work):
    c = np.arange(nthreads_work)
    r = (c >> 1) & (BN - 1)
    ch = 2 * (c >> 7) + (c & 1)
    return c, r, ch


def load_q(sm: Smem, q_rows_u16):
    c, r, ch = gather_rows_plan(HB * QK_CHUNKS)
    base = sm.addr(Q_OFF) + core_byte_offset(HB, r, ch * 8)
    for e in range(8):
        sm.write_bf16(base + 2 * e, q_rows_u16[r, ch * 8 + e])
    return base


def gather_kv(sm: Smem, stage, kv_u16, idx_row, blk, limit, S):
    c, r, ch = gather_rows_plan(BN * QK_CHUNKS)
    row = entry_row(idx_row, blk * BN + r, limit, S)
    base = sm.addr(KV_OFF + stage * KV_BYTES) + core_byte_offset(BN, r, ch * 8)
    src = np.where(row[:, None] >= 0, kv_u16[np.maximum(row, 0)[:, None], ch[:, None] * 8 + np.arange(8)], 0)
    for e in range(8):
        sm.write_bf16(base + 2 * e, src[:, e])  # cp.async zero-fill when row < 0
    first = (c < 2 * BN) & ((c & 1) == 0)
    sm.write_f32(VALID_OFF + 4 * (stage * BN + r[first]), np.where(row[first] >= 0, 1.0, 0.0))
    return base


def check_tile_coverage(bases, start, nbytes, what):
    """Every 16-byte chunk of a tile is written by exactly one thread's 16-byte copy."""
    cnt = np.bincount((np.asarray(bases) - start) // 16, minlength=nbytes // 16)
    assert np.all((np.asarray(bases) - start) % 16 == 0), what
    assert cnt.size == nbytes // 16 and np.all(cnt == 1), f"{what}: coverage {cnt.min()}..{cnt.max()}"


MUTATIONS = {  # deliberate layout bugs the model must catch (shows the check can fail)
    "K descriptor LBO/SBO swapped",
    "V descriptor LBO/SBO swapped",
    "V read K-major (no transpose)",
    "P stored transposed",
    "K step advances one column group",
    "mask token of a fragment value off by the pair layout",
    "epilogue rows from the wrong fragment half",
}


def run_cta(q_u16, kv_u16, idx_row, limit, S, sink, sm_scale, mutation=None):
    """One CTA: q_u16 [64, 576] (the head block), returns out [64, 512] fp32 (pre-bf16), lse [64]."""
    sm = Smem()
    qb = load_q(sm, q_u16)
    check_tile_coverage(qb, sm.addr(Q_OFF), Q_BYTES, "Q tile")
    nblocks = (limit + BN - 1) // BN
    if nblocks > 0:
        kb = gather_kv(sm, 0, kv_u16, idx_row, 0, limit, S)
        check_tile_coverage(kb, sm.addr(KV_OFF), KV_BYTES, "KV tile")
    scale2 = np.float32(sm_scale * LOG2E)
    t = np.arange(128)
    warp, lane = t >> 5, t & 31
    row0 = 16 * (warp & 3) + (lane >> 2)
    c4 = lane & 3
    o = [np.zeros((128, 128), np.float32) for _ in range(2)]
    m_run = np.full((128, 2), MAX_INIT, np.float32)
    l_run = np.zeros((128, 2), np.float32)
    p_written = np.zeros(P_BYTES // 4, np.int64)

    for blk in range(nblocks):
        stage = blk & 1
        if blk + 1 < nblocks:
            gather_kv(sm, stage ^ 1, kv_u16, idx_row, blk + 1, limit, S)
        kv_off = KV_OFF + stage * KV_BYTES
        valid = sm.read_f32(VALID_OFF + 4 * (stage * BN + np.arange(BN)))
        # warpgroup 0: S = Q K^T
        s = np.zeros((128, 32), np.float32)
        a0 = wgmma_desc(sm.addr(Q_OFF), HB * 16, ROW_GROUP_BYTES)
        b0 = wgmma_desc(sm.addr(kv_off), COL_GROUP_BYTES, ROW_GROUP_BYTES)
        if mutation == "K descriptor LBO/SBO swapped":
            b0 = wgmma_desc(sm.addr(kv_off), ROW_GROUP_BYTES, COL_GROUP_BYTES)
        kstep = 1 if mutation == "K step advances one column group" else 2
        for ks in range(DQK // 16):
            s = wgmma(s, sm, a0 + ((ks * 2 * HB * 16) >> 4), b0 + ((ks * kstep * COL_GROUP_BYTES) >> 4),
                      64, False, ks > 0)
        i = np.arange(32)[None, :]
        tok = 8 * (i >> 2) + 2 * c4[:, None] + (i & 1)
        if mutation == "mask token of a fragment value off by the pair layout":
            tok = 8 * (i >> 2) + c4[:, None] + 4 * (i & 1)
        s = np.where(valid[tok] != 0, s * scale2, -np.inf).astype(np.float32)
        mx = np.stack([s[:, [j for j in range(32) if ((j >> 1) & 1) == hf]].max(1) for hf in range(2)], 1)
        for x in (1, 2):  # __shfl_xor_sync within the quad
            mx = np.maximum(mx, mx[t ^ x])
        m_new = np.maximum(m_run, mx)
        with np.errstate(invalid="ignore"):
            alpha = np.exp2(m_run - m_new).astype(np.float32)
        m_run = m_new
        l_run = l_run * alpha
        for hf in range(2):
            sel = c4 == 0
            sm.write_f32(ALPHA_OFF + 4 * (row0[sel] + 8 * hf), alpha[sel, hf])
        p_addr = sm.addr(P_OFF)
        for j in range(0, 32, 2):
            hf = (j >> 1) & 1
            p0 = np.exp2(s[:, j] - m_run[:, hf]).astype(np.float32)
            p1 = np.exp2(s[:, j + 1] - m_run[:, hf]).astype(np.float32)
            l_run[:, hf] += p0 + p1
            addr = p_addr + core_byte_offset(HB, row0 + 8 * hf, 8 * (j >> 2) + 2 * c4)
            if mutation == "P stored transposed":
                a1 = p_addr + core_byte_offset(HB, 8 * (j >> 2) + 2 * c4 + 1, row0 + 8 * hf)
                addr = p_addr + core_byte_offset(HB, 8 * (j >> 2) + 2 * c4, row0 + 8 * hf)
                sm.write_bf16(addr, bf16_round(p0))
                sm.write_bf16(a1, bf16_round(p1))
                continue
            sm.write_bf16(addr, bf16_round(p0))
            sm.write_bf16(addr + 2, bf16_round(p1))
            np.add.at(p_written, (addr - p_addr) // 4, 1)
        # both warpgroups: O = alpha O + P V
        for wgi in range(2):
            a_lo = sm.read_f32(ALPHA_OFF + 4 * row0)[:, None]
            a_hi = sm.read_f32(ALPHA_OFF + 4 * (row0 + 8))[:, None]
            ii = np.arange(128)[None, :]
            o[wgi] = np.where((ii % 4) < 2, o[wgi] * a_lo, o[wgi] * a_hi).astype(np.float32)
            pa0 = wgmma_desc(sm.addr(P_OFF), HB * 16, ROW_GROUP_BYTES)
            v_lbo, v_sbo = ROW_GROUP_BYTES, COL_GROUP_BYTES
            if mutation == "V descriptor LBO/SBO swapped":
                v_lbo, v_sbo = v_sbo, v_lbo
            vb0 = wgmma_desc(sm.addr(kv_off) + int(core_byte_offset(BN, 0, wgi * (DV // 2))), v_lbo, v_sbo)
            tnsp = mutation != "V read K-major (no transpose)"
            for ks in range(BN // 16):
                o[wgi] = wgmma(o[wgi], sm, pa0 + ((ks * 2 * HB * 16) >> 4),
                               vb0 + ((ks * 2 * ROW_GROUP_BYTES) >> 4), 256, tnsp, True)
    if nblocks > 0 and mutation is None:
        assert np.all(p_written == nblocks), "P tile: each 4-byte pair written once per block"

    for x in (1, 2):
        l_run = l_run + l_run[t ^ x]
    for hf in range(2):
        sel = c4 == 0
        sm.write_f32(SUM_OFF + 4 * (row0[sel] + 8 * hf), l_run[sel, hf])
        sm.write_f32(ALPHA_OFF + 4 * (row0[sel] + 8 * hf), m_run[sel, hf])
    out = np.full((HB, DV), np.nan, np.float32)
    lse = np.full(HB, np.nan, np.float32)
    for wgi in range(2):
        for hf in range(2):
            r = row0 + 8 * hf
            l = sm.read_f32(SUM_OFF + 4 * r)
            m = sm.read_f32(ALPHA_OFF + 4 * r)
            with np.errstate(over="ignore"):  # empty rows: m = -1e30, masked by l > 0 below
                denom = l + (np.exp2(sink[r] * LOG2E - m) if sink is not None else 0)
            inv = np.where(l > 0, 1 / np.where(l > 0, denom, 1), 0).astype(np.float32)
            with np.errstate(divide="ignore"):
                row_lse = np.where(l > 0, (m + np.log2(np.maximum(l, 1e-38))) * LN2, -np.inf)
            for j in range(32):
                for e in range(2):
                    col = wgi * (DV // 2) + 2 * c4 + 8 * j + e
                    v = 4 * j + (hf + 2 * e if mutation == "epilogue rows from the wrong fragment half" else 2 * hf + e)
                    out[r, col] = o[wgi][:, v] * inv
            if wgi == 0:
                lse[r[c4 == 0]] = row_lse[c4 == 0]
    assert not np.isnan(out).any() and not np.isnan(lse).any(), "output not fully written"
    return out, lse


def reference(q, kv, idx_row, limit, S, sink, sm_scale):
    q64, kv64 = q.astype(np.float64), kv.astype(np.float64)
    rows = [int(r) for j, r in enumerate(idx_row) if j < limit and 0 <= r < S]
    if not rows:
        return np.zeros((HB, DV)), np.full(HB, -np.inf)
    kr = kv64[rows]
    sc = sm_scale * q64 @ kr.T
    m = sc.max(1, keepdims=True)
    e = np.exp(sc - m)
    l = e.sum(1, keepdims=True)
    denom = l + (np.exp(sink[:, None].astype(np.float64) - m) if sink is not None else 0)
    return (e / denom) @ kr[:, :DV], (m + np.log(l))[:, 0]


def make_case(rng, K, limit, with_sink, n_bad, S=700):
    q = bf16_to_f32(bf16_round(rng.standard_normal((HB, DQK)).astype(np.float32)))
    kv = bf16_to_f32(bf16_round(rng.standard_normal((S, DQK)).astype(np.float32)))
    idx = rng.integers(0, S, K).astype(np.int64)
    bad = rng.choice(K, n_bad, replace=False)
    idx[bad] = rng.choice(np.array([-1, -5, S, S + 3]), n_bad)
    sink = rng.standard_normal(HB).astype(np.float32) if with_sink else None
    return q, kv, idx, limit, S, sink, DQK ** -0.5


def check_case(case, mutation=None):
    q, kv, idx, limit, S, sink, sm_scale = case
    try:
        out, lse = run_cta(bf16_round(q), bf16_round(kv), idx, limit, S, sink, sm_scale, mutation)
    except (AssertionError, IndexError) as e:
        return False, f"raised {type(e).__name__}: {e}"
    ref_o, ref_l = reference(q, kv, idx, limit, S, sink, sm_scale)
    scale_o = np.abs(ref_o).max()
    err_o = np.abs(out - ref_o).max() / scale_o if scale_o > 0 else np.abs(out).max()
    finite = np.isfinite(ref_l)
    lse_ok = np.array_equal(finite, np.isfinite(lse)) and np.all(np.isneginf(lse[~finite])) and (
        np.allclose(lse[finite], ref_l[finite], rtol=1e-4, atol=1e-4))
    err_l = np.abs(lse[finite] - ref_l[finite]).max() if finite.any() else 0.0
    good = err_o < 1e-2 and lse_ok
    return bool(good), f"out rel err {err_o:.2e}, lse max err {err_l:.2e}"


# ---- barrier schedule ---------------------------------------------------------------------------
# The kernel's shared-memory accesses per phase (the code between two __syncthreads), per
# warpgroup, for block blk with stage s = blk & 1 (transcribed from sparse_mla_wgmma.cuh). "w"
# includes cp.async copies, which stay in flight until the issuing thread's cp.async.wait, so a
# copy issued in one phase also writes during every later phase until that wait (wait_in).
PHASES = [
    # (name, {warpgroup: [(region, access)]}, [(issuing wg, region, phase index of the wait)])
    ("prologue", {0: [("Q", "w"), ("KV0", "w"), ("valid0", "w")],
                  1: [("Q", "w"), ("KV0", "w"), ("valid0", "w")]}, []),
    ("S + softmax", {0: [("Q", "r"), ("KV[s]", "r"), ("valid[s]", "r"), ("alpha", "w"), ("P", "w")],
                     1: [("KV[s^1]", "w"), ("valid[s^1]", "w")]}, [(1, "KV[s^1]", 2)]),
    ("P V", {0: [("alpha", "r"), ("P", "r"), ("KV[s]", "r")],
             1: [("alpha", "r"), ("P", "r"), ("KV[s]", "r")]}, []),
    ("epilogue", {0: [("alpha", "w"), ("sum", "w")], 1: []}, []),
    ("output", {0: [("alpha", "r"), ("sum", "r")], 1: [("alpha", "r"), ("sum", "r")]}, []),
]


def check_barrier_schedule():
    """No shared region is written by one warpgroup while the other touches it in the same phase
    (counting in-flight copies), so the two __syncthreads per block are sufficient."""
    in_flight = []
    for idx, (name, acc, issued) in enumerate(PHASES):
        in_flight = [f for f in in_flight if f[2] > idx]
        writes = {wg: {r for r, a in acc[wg] if a == "w"} | {r for w, r, _ in in_flight if w == wg}
                  for wg in (0, 1)}
        touches = {wg: {r for r, _ in acc[wg]} for wg in (0, 1)}
        for wg in (0, 1):
            clash = writes[wg] & touches[1 - wg] - ({"Q", "KV0", "valid0"} if name == "prologue" else set())
            assert not clash, f"phase {name}: warpgroup {wg} writes {clash} while {1 - wg} uses it"
        in_flight += [(wg, r, w) for wg, r, w in issued]
    # the copies of block blk + 1 land in KV[s^1] = next block's KV[s]: waited before it is read
    assert all(w == 2 for _, _, w in PHASES[1][2])


def main() -> int:
    assert SMEM_BYTES <= MAX_SMEM
    assert SMEM_BASE + SMEM_BYTES < (1 << 18), "descriptor start address covers 256 KB"
    check_barrier_schedule()
    rng = np.random.default_rng(0)
    cases = [  # (K, limit, with sink, n invalid entries)
        (192, 192, False, 0),
        (256, 200, True, 17),   # ragged last block, skipped entries, sink
        (128, 0, True, 0),      # empty row
        (64, 64, False, 64),    # every entry invalid
    ]
    ok = True
    for K, limit, with_sink, n_bad in cases:
        good, msg = check_case(make_case(rng, K, limit, with_sink, n_bad))
        print(f"K={K:4d} limit={limit:4d} sink={with_sink!s:5} bad={n_bad:3d}: {msg} -> {'ok' if good else 'FAIL'}")
        ok &= good
    case = make_case(rng, 128, 128, True, 24)
    for mutation in sorted(MUTATIONS):
        good, msg = check_case(case, mutation)
        print(f"mutation '{mutation}': {msg} -> {'caught' if not good else 'NOT CAUGHT'}")
        ok &= not good
    print("all ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
