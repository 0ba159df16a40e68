"""MODEL: the performance model of topk_radix_kernel (csrc/topk/topk_kernels.cuh), printed from
its parameters so that the table in the kernel's design comment can be reproduced.

    python tools/topk_model.py                      # H100 SXM, 64 x 131072 fp32, k = 2048
    python tools/topk_model.py --T 4096 --rows 16   # another shape (rows: simulated rows)
    python tools/topk_model.py --emu                # + the emulator's sync counters on small rows

What is computed and what is assumed:
  * computed exactly, from the launcher's rules and from simulated N(0,1) rows (torch, seeded):
    the cluster size and waves, the radix passes a row takes (the kernel's early exit when a
    pass's threshold bin is taken whole), the histogram atomics per element of each pass, the
    bank-conflict degree of the first pass's shared-memory atomics (lanes per bank, per warp
    instruction, in the kernel's access order), the synchronisation counts per row in each
    SyncMode (the emulator's counters cluster_barriers / mbarrier_phases follow these formulas
    exactly: tests/test_emu_topk.py::test_sync_counts_match_the_model);
  * ASSUMED, labelled "assumption" in PARAMS: the H100's clock, achievable HBM fraction, the
    latency of a cluster barrier and of an mbarrier phase, SM-to-SM (DSMEM) bandwidth,
    shared-atomic and instruction-issue rates, instructions per key of the shared-memory
    sweeps, the kernel's fixed start/drain cost. None of them is measured here (no GPU): the
    first GPU run (`dsa-bench topk`, both DSA_TOPK_SYNC modes side by side) calibrates them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, replace

import torch

# ---- the kernel's constants (topk_kernels.cuh / topk_launch.cu) --------------------------------
BLOCK = 512
CACHE_KEYS = 20480
MAX_CLUSTER = 16
PASS_SHIFT = (21, 10, 0)
PASS_BINS = (2048, 2048, 1024)
CTAS_PER_SM = 2          # __launch_bounds__(512, 2); the largest footprint fits twice (static_assert)


@dataclass(frozen=True)
class Params:
    # H100 SXM5 (datasheet where marked, else assumption)
    hbm_tbs: float = 3.35        # datasheet: HBM3 3.35 TB/s
    sms: int = 132               # datasheet
    clusters_resident: int = 32  # assumption: 8-CTA clusters co-resident at 2 CTAs/SM: 4 per GPC
                                 # (GPCs of 16-18 SMs) x 8 GPCs; the device's
                                 # cudaOccupancyMaxActiveClusters is the real figure
    clock_ghz: float = 1.755     # assumption: sustained SM clock under load (boost max 1.98)
    hbm_eff: float = 0.90        # assumption: achievable fraction of peak for a pure read stream
    t_cluster_barrier_us: float = 0.45  # assumption: barrier.cluster arrive+wait ~300 clk plus the
                                        # MEMBAR.ALL.GPU ptxas emits for cluster.sync (SASS of the
                                        # kCluster kernel: MEMBAR.ALL.GPU, UCGABAR_ARV, UCGABAR_WAIT,
                                        # CCTL.IVALL per sync) ~500 clk, an L2 round trip
    t_mbar_phase_us: float = 0.15       # assumption: st.async one-way SM-to-SM ~200 clk (order of
                                        # the DSM latency in Luo et al., arXiv 2402.13499) plus the
                                        # try_wait wake-up
    t_dsmem_rt_us: float = 0.12         # assumption: one remote shared load round trip (pull mode)
    dsmem_gbs_per_sm: float = 25.0      # assumption: ~3.3 TB/s aggregate SM-to-SM throughput
                                        # (Luo et al. 2402.13499, as recalled) / 132 SMs
    atom_clk_per_wavefront: float = 2.0  # assumption: one shared-atomic wavefront (one lane per
                                         # bank) per 2 clocks per SM
    ipc: float = 3.0             # assumption: warp instructions issued per clock per SM (4 schedulers
                                 # at ~75% with 32 warps resident)
    instr_pass0_per_vec: float = 35.0  # assumption (source reading): LDG.128, 4 key transforms,
                                       # STS.128, 4 shifts + ATOMS, loop: per thread per 4 keys
    instr_sweep_per_key: float = 9.0   # assumption: a later pass over the key cache, per key
                                       # (LDS, mask/compare, 64-bit index and bound, branch)
    instr_output_per_key: float = 12.0  # assumption: the output sweep per key
    t_scan_us: float = 0.17      # assumption: select_threshold_bin (2 bar.sync, shuffles, 16-warp
                                 # loop) and the above-count loop, ~300 clk
    t_fixed_us: float = 2.0      # assumption: kernel start, first-byte HBM latency, tail drain
    # design levers (not today's kernel; the defaults model the kernel as it is)
    exchanged_bins_frac: float = 1.0  # fraction of a pass's bins sent through DSMEM
    extra_phases_per_pass: int = 0    # more mbarrier phases per pass (a two-level exchange: +2)
    pipelined: bool = False           # a row's tail overlaps the next row's stream (persistent)


PARAMS = Params()


# ---- the launcher's choices (topk_launch.cu) --------------------------------------------------

def choose_cluster_size(T: int, S: int, sms: int = 132, max_cs: int = MAX_CLUSTER) -> int:
    cs = 1
    while cs < max_cs and math.ceil(S / cs) > CACHE_KEYS:
        cs *= 2
    while cs < max_cs and T * cs < 2 * sms and math.ceil(S / (2 * cs)) >= 2048:
        cs *= 2
    return cs


# ---- the kernel's arithmetic on real data -----------------------------------------------------

def topk_keys(x: torch.Tensor) -> torch.Tensor:
    """topk_key.h's order-preserving uint32 key of fp32 values, as int64."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where(bits == 0x80000000, torch.zeros_like(bits), bits)            # -0.0 == +0.0
    key = torch.where(bits >= 0x80000000, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    return torch.where(torch.isnan(x.float()), torch.zeros_like(key), key)          # NaN lowest


def radix_passes(keys: torch.Tensor, k: int):
    """(passes, [elements histogrammed in each pass]) of one row's keys: the kernel's loop,
    including its early exit when the threshold bin is taken whole (0 passes: n <= k)."""
    n = keys.numel()
    if n <= k:
        return 0, []
    prefix = mask = 0
    need = k
    counted = []
    for p in range(3):
        shift, nbins = PASS_SHIFT[p], PASS_BINS[p]
        sel = keys[(keys & mask) == prefix] if p else keys
        counted.append(sel.numel())
        hist = torch.bincount((sel >> shift) & (nbins - 1), minlength=nbins)
        suffix = hist.flip(0).cumsum(0).flip(0)                    # suffix[b] = sum(hist[b:])
        b = int(torch.nonzero(suffix >= need).max())               # the threshold bin
        above = int(suffix[b + 1]) if b + 1 < nbins else 0
        need -= above
        prefix |= b << shift
        mask |= (nbins - 1) << shift
        if int(hist[b]) == need:
            return p + 1, counted
    return 3, counted


def first_pass_conflict_degree(keys: torch.Tensor) -> float:
    """Mean wavefronts of a warp's atomicAdd(&lh[bin], 1u) in first_pass: lane l of a warp holds
    the 4 consecutive keys of float4 j0 + l, one instruction per component. The increment
    compiles to ATOMS.POPC.INC (SASS), which combines lanes on the same address, so a
    wavefront is one distinct address per bank: wavefronts = the most distinct bins in a bank."""
    n = keys.numel() // 128 * 128
    bins = (keys[:n] >> PASS_SHIFT[0]).reshape(-1, 32, 4)            # [warp op, lane, component]
    bins = bins.transpose(1, 2).reshape(-1, 32).sort(1).values         # [instruction, lane]
    first = torch.ones_like(bins, dtype=torch.bool)
    first[:, 1:] = bins[:, 1:] != bins[:, :-1]                         # one lane per distinct bin
    counts = torch.zeros(bins.shape[0], 32, dtype=torch.int64).scatter_add_(1, bins & 31, first.long())
    return counts.max(1).values.float().mean().item()


def sync_counts(mode: str, cs: int, passes: int, sorted: bool) -> dict:
    """Per row (cluster), as the emulator counts them: completed barrier.cluster phases and
    completed mbarrier phases summed over the cluster's CTAs; and the waits on one CTA's path."""
    if passes == 0:  # n <= k: no histogram
        if mode == "mbarrier":
            return dict(cluster_barriers=1, mbarrier_phases=1 if sorted else 0, waits_per_cta=1 + sorted)
        return dict(cluster_barriers=1 if sorted else 0, mbarrier_phases=0, waits_per_cta=int(sorted))
    if mode == "mbarrier":
        per_pass = 2 if cs > 1 else 0          # reduce-scatter + all-gather phase in every CTA
        return dict(cluster_barriers=1,        # the split init barrier (wait overlaps pass 0)
                    mbarrier_phases=cs * (per_pass * passes + 1) + (1 if sorted else 0),
                    waits_per_cta=per_pass * passes + 1 + (1 if sorted else 0))
    # kCluster: one full barrier per pass, after the count exchange, before exit
    return dict(cluster_barriers=passes + 2, mbarrier_phases=0, waits_per_cta=passes + 2)


# ---- the estimate -----------------------------------------------------------------------------

def estimate(T: int, S: int, k: int, mode: str, passes: float, counted_frac, conflict: float,
             P: Params = PARAMS, sorted: bool = False) -> dict:
    cs = choose_cluster_size(T, S, P.sms)
    slice_ = math.ceil(S / cs)
    cached = slice_ <= CACHE_KEYS
    per_wave_rows = P.clusters_resident * 8 // cs if cs > 1 else P.sms * CTAS_PER_SM
    waves = math.ceil(T / per_wave_rows)
    us_per_clk = 1e-3 / P.clock_ghz
    ctas_sm = CTAS_PER_SM
    rows_wave = min(T, per_wave_rows)
    # pass 0: HBM stream vs shared atomics vs issue, per SM (every SM runs 2 CTAs)
    t_hbm = rows_wave * S * 4 / (P.hbm_eff * P.hbm_tbs * 1e12) * 1e6
    warp_ops = ctas_sm * slice_ / 32
    t_atom = warp_ops * conflict * P.atom_clk_per_wavefront * us_per_clk
    t_issue0 = ctas_sm * slice_ / 128 * P.instr_pass0_per_vec / P.ipc * us_per_clk
    t_pass0 = max(t_hbm, t_atom, t_issue0)
    # later passes and the output pass: sweeps of the key cache (or global re-reads)
    sweep = ctas_sm * slice_ / 32 * P.instr_sweep_per_key / P.ipc * us_per_clk
    out_sweep = ctas_sm * slice_ / 32 * P.instr_output_per_key / P.ipc * us_per_clk
    if not cached:  # every later pass re-reads the slice from global memory (L2 if it fits)
        sweep = max(sweep, t_hbm)
        out_sweep = max(out_sweep, t_hbm)
    bw_sm = P.dsmem_gbs_per_sm * 1e3   # bytes per us
    exch = []
    for p in range(int(math.ceil(passes))):
        weight = min(1.0, passes - p)   # a fractional mean pass count weighs the last pass
        B = PASS_BINS[p]
        if cs == 1:
            t = P.t_scan_us + (P.t_cluster_barrier_us if mode == "cluster" else 0.0)
        elif mode == "mbarrier":
            push = ctas_sm * 2 * B * 4 * (cs - 1) / cs * P.exchanged_bins_frac
            t = (2 + P.extra_phases_per_pass) * P.t_mbar_phase_us + push / bw_sm + P.t_scan_us
        else:
            pull = ctas_sm * B * 4 * (cs - 1)
            t = P.t_cluster_barrier_us + math.ceil(cs / 4) * P.t_dsmem_rt_us + pull / bw_sm + P.t_scan_us
        exch.append(weight * t)
    if mode == "mbarrier":
        t_counts = P.t_mbar_phase_us if cs > 1 else 0.0
        t_exit = (P.t_mbar_phase_us + P.t_cluster_barrier_us) if sorted else 0.0  # release.cluster: MEMBAR.GPU
    else:
        t_counts = P.t_cluster_barrier_us + (P.t_dsmem_rt_us if cs > 1 else 0.0)
        t_exit = P.t_cluster_barrier_us
    t_tail = sum(exch) + max(passes - 1, 0) * sweep + t_counts + out_sweep + t_exit
    if P.pipelined:  # two-stage pipeline over the waves: stream of wave w+1 under the tail of w
        total = P.t_fixed_us + t_pass0 + (waves - 1) * max(t_pass0, t_tail) + t_tail
    else:
        total = P.t_fixed_us + waves * (t_pass0 + t_tail)
    return dict(cs=cs, slice=slice_, cached=cached, waves=waves, rows_wave=rows_wave, t_hbm=t_hbm,
                t_atom=t_atom, t_issue0=t_issue0, t_pass0=t_pass0, exch=exch, sweep=sweep,
                out_sweep=out_sweep, t_counts=t_counts, t_exit=t_exit, t_tail=t_tail, total=total,
                floor=T * S * 4 / (P.hbm_tbs * 1e12) * 1e6)


# ---- the emulator's counters (optional) -------------------------------------------------------

def emulator_counts(cases):
    """[(mode, T, S, k, sorted, cs, passes per row, measured, model)] from tests/emulator.py."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    sys.path[:0] = [tests]
    import emulator as E
    import test_emu_topk as t
    lib = t._setup(E.load("topk"))
    E.set_env(lib, "DSA_EMU_NUM_SMS", None)
    E.set_env(lib, "DSA_EMU_MAX_CLUSTER", None)
    res = []
    for mode in ("mbarrier", "cluster"):
        E.set_env(lib, "DSA_TOPK_SYNC", mode)
        for T, S, k, sorted in cases:
            x = t.rows(T, S, torch.Generator().manual_seed(S + T))
            _, reports, c = t.run_topk(lib, x, k, sorted=sorted)
            assert reports == [], reports
            cs = t.cluster_size(c, T)
            ps = [radix_passes(topk_keys(x[r]), k)[0] for r in range(T)]
            model = [sync_counts(mode, cs, p, sorted) for p in ps]
            res.append((mode, T, S, k, sorted, cs, ps,
                        (c["cluster_barriers"], c["mbarrier_phases"]),
                        (sum(m["cluster_barriers"] for m in model), sum(m["mbarrier_phases"] for m in model))))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--S", type=int, default=131072)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=64, help="N(0,1) rows simulated for the pass statistics")
    ap.add_argument("--sorted", action="store_true")
    ap.add_argument("--emu", action="store_true", help="also run the emulator on small rows (both modes)")
    a = ap.parse_args(argv)
    P = PARAMS
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.S, generator=gen)
    keys = topk_keys(x)
    stats = [radix_passes(keys[r], a.k) for r in range(a.rows)]
    passes = [p for p, _ in stats]
    mean_p = sum(passes) / len(passes)
    frac = [sum(c[i] for _, c in stats if len(c) > i) / (a.rows * a.S) for i in range(3)]
    conflict = first_pass_conflict_degree(keys[: min(a.rows, 8)].reshape(-1))
    cs = choose_cluster_size(a.T, a.S, P.sms)
    print(f"MODEL topk_radix_kernel: T={a.T} S={a.S} k={a.k} fp32 on H100 SXM ({P.hbm_tbs} TB/s, {P.sms} SMs)"
          f"{' sorted' if a.sorted else ''}")
    print(f"launcher: cluster size {cs}, slice {math.ceil(a.S / cs)} keys per CTA "
          f"({'key cache' if math.ceil(a.S / cs) <= CACHE_KEYS else 'streaming: every pass re-reads global'}), "
          f"{a.T * cs} CTAs of {BLOCK} threads, {CTAS_PER_SM} per SM")
    print(f"bytes per row: pass 0 reads {4 * a.S} B of logits from HBM; later passes and the output pass "
          f"read the same {4 * a.S} B from shared memory; output {4 * a.k} B"
          + (f" + sort {8 * a.k} B" if a.sorted else ""))
    hist = ", ".join(f"{c:.3g} ({pass_bins})" for c, pass_bins in zip(frac, ("2048 bins", "2048 bins", "1024 bins")))
    print(f"radix passes per row over {a.rows} N(0,1) rows: mean {mean_p:.2f} "
          f"(1: {passes.count(1)}, 2: {passes.count(2)}, 3: {passes.count(3)}); "
          f"shared atomics per element and pass: {hist}")
    print(f"pass-0 shared atomics: {conflict:.2f} wavefronts per warp instruction (distinct bins per bank, mean)")
    print()
    print(f"{'sync per row (emulator-counted)':<44}{'mbarrier':>12}{'cluster':>12}")
    for p in (1, 2, 3):
        mb, cl = sync_counts("mbarrier", cs, p, a.sorted), sync_counts("cluster", cs, p, a.sorted)
        print(f"  {p} pass(es): cluster barriers / mbarrier phases   {mb['cluster_barriers']:>4} / {mb['mbarrier_phases']:<4}"
              f"{cl['cluster_barriers']:>6} / {cl['mbarrier_phases']:<4}")
        print(f"  {p} pass(es): waits on one CTA's path              {mb['waits_per_cta']:>8}{cl['waits_per_cta']:>12}")
    print()
    rows = {m: estimate(a.T, a.S, a.k, m, mean_p, frac, conflict, P, a.sorted) for m in ("mbarrier", "cluster")}
    e = rows["mbarrier"]
    print(f"waves: {e['waves']} ({e['rows_wave']} rows = {e['rows_wave'] * cs} CTAs per wave, "
          f"{P.clusters_resident} clusters resident assumed)")
    print(f"{'time per wave (us)':<44}{'mbarrier':>12}{'cluster':>12}")

    def line(label, key, fmt="{:>12.2f}"):
        print(f"  {label:<42}" + "".join(fmt.format(rows[m][key]) for m in ("mbarrier", "cluster")))
    line("pass 0 HBM stream", "t_hbm")
    line("pass 0 shared atomics", "t_atom")
    line("pass 0 issue", "t_issue0")
    line("pass 0 = max of the three", "t_pass0")
    for i in range(len(e["exch"])):
        print(f"  {'histogram exchange + threshold, pass %d' % i:<42}"
              + "".join(f"{rows[m]['exch'][i]:>12.2f}" for m in ("mbarrier", "cluster")))
    line("key-cache sweep per later pass", "sweep")
    line("count exchange", "t_counts")
    line("output sweep", "out_sweep")
    line("exit / sorted hand-off", "t_exit")
    line("tail after the stream", "t_tail")
    print(f"  {'TOTAL (fixed %.1f + waves x (pass 0 + tail))' % P.t_fixed_us:<42}"
          + "".join(f"{rows[m]['total']:>12.1f}" for m in ("mbarrier", "cluster")))
    if a.sorted:
        print("(sorted: CTA 0's bitonic sort of the k pairs is not modelled; only its hand-off is)")
    print(f"SPEC target 15 us; memory floor {e['floor']:.1f} us at peak HBM "
          f"({e['floor'] / P.hbm_eff:.1f} us at {P.hbm_eff:.0%})")
    print()
    print("sensitivity of TOTAL (us) to the least certain assumptions (mbarrier / cluster):")
    for label, q in (("DSMEM 4x faster (100 GB/s per SM)", replace(P, dsmem_gbs_per_sm=100.0)),
                     ("DSMEM 2x slower (12.5 GB/s per SM)", replace(P, dsmem_gbs_per_sm=12.5)),
                     ("cluster barrier 1.0 us", replace(P, t_cluster_barrier_us=1.0)),
                     ("HBM at 80% of peak", replace(P, hbm_eff=0.80)),
                     ("sweeps at 4 IPC", replace(P, ipc=4.0))):
        r = [estimate(a.T, a.S, a.k, m, mean_p, frac, conflict, q, a.sorted)["total"] for m in ("mbarrier", "cluster")]
        print(f"  {label:<42}{r[0]:>12.1f}{r[1]:>12.1f}")
    print("what would close the gap (design levers, modelled; mbarrier mode):")
    two_level = dict(exchanged_bins_frac=96 / 2048, extra_phases_per_pass=2)
    lean = dict(instr_sweep_per_key=4.0, instr_output_per_key=6.0)
    for label, q in (("A two-level exchange (64 group sums, then 32 bins)", replace(P, **two_level)),
                     ("B sweeps: LDS.128, 32-bit index (4 / 6 instr per key)", replace(P, **lean)),
                     ("C persistent, next row's stream under this tail", replace(P, pipelined=True)),
                     ("A + B", replace(P, **two_level, **lean)),
                     ("A + B + C", replace(P, **two_level, **lean, pipelined=True))):
        r = estimate(a.T, a.S, a.k, "mbarrier", mean_p, frac, conflict, q, a.sorted)
        print(f"  {label:<54}{r['total']:>8.1f}  (tail {r['t_tail']:.2f} per wave)")
    if a.emu:
        print()
        print("emulator (tests/emulator.py) counters vs the model, per launch:")
        print(f"  {'mode':<9}{'T':>3}{'S':>7}{'k':>6} sorted  cs  passes/row   measured (cb, mb)   model (cb, mb)")
        for mode, T, S, k, srt, cs_, ps, meas, mod in emulator_counts(
                [(1, 16384, 256, False), (2, 8192, 256, True), (3, 3000, 100, False)]):
            print(f"  {mode:<9}{T:>3}{S:>7}{k:>6} {str(srt):<7}{cs_:>3}  {str(ps):<12}{str(meas):>14}{str(mod):>19}"
                  + ("" if meas == mod else "  MISMATCH"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
