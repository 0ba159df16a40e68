"""Context-parallel DSA rows: time and bytes communicated per decode step and per prefill token.

    python -m dsa_ext.bench.context_parallel                      # gloo on the CPU, W = 1, 2, 4
    torchrun --nproc-per-node 4 -m dsa_ext.bench.context_parallel # NCCL, one GPU per rank

Not a `dsa-bench` family: the cases need several processes. Without torchrun it spawns W gloo
processes per world size on this machine (one thread each); under torchrun it runs on the
launched group (NCCL when CUDA is present) at that group's W only. Per world size and decode
mode (exact / union / union_share, and exact+scatter: each rank keeps its Hq/W heads) it prints the median step time (the slowest rank's, each
step between barriers), the bytes each rank sends and receives per step (counted by
`context_parallel.CommStats`, ring all-reduce assumed), the bytes of vLLM's exact mode for the
same step (all-gather of W*K (fp32 value, int32 id) candidates per query, the same collective
as ours), and the union modes' recall against exact, averaged over --recall-queries random
queries (random keys, not a model's: a model's recall differs), with the relative error of
their output against exact (||out - out_exact|| / ||out_exact||). Prefill: the forward per token, and its bytes.
On a 2-core CPU, W > 2 oversubscribes the cores: the times are not a scaling measurement there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

MODES = ("exact", "union", "union_share")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps):
    """Median over reps of the slowest rank's time of fn (barrier before each rep)."""
    times = []
    out = None
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return statistics.median(times), out


def run_rows(args, device):
    import dsa_ext  # noqa: F401
    from dsa_ext import context_parallel as cp

    W, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    L, K, N = args.context, args.topk, args.n_new
    H, D, Hq, bs = args.index_heads, 128, args.heads, 64
    rows = []

    cache = cp.ShardedDSACache(-(-L // (bs * W)) + 2, bs, D, kv_cache_dtype="fp8", device=device)
    seq = cache.add_sequence()
    chunk = 8192                      # the writers get every token; each rank keeps its own
    for a in range(0, L, chunk):
        n = min(chunk, L - a)
        cache.append([seq], n, torch.randn(n, D, generator=g).bfloat16().to(device),
                     torch.randn(n, 576, generator=g).bfloat16().to(device))
    q = (torch.randn(1, N, H, D, generator=g) * 4).to(torch.float8_e4m3fn).to(device)
    w = (torch.rand(N, H, generator=g) * H ** -0.5).to(device)
    q_lat = torch.randn(1, N, Hq, 576, generator=g).bfloat16().to(device)
    scale = 192 ** -0.5

    def recall_over_queries(mode):
        """Mean union-mode recall and relative output error against exact over
        --recall-queries fresh random queries (untimed)."""
        gq = torch.Generator().manual_seed(2)
        total, err = 0.0, 0.0
        for _ in range(args.recall_queries):
            qq = (torch.randn(1, N, H, D, generator=gq) * 4).to(torch.float8_e4m3fn).to(device)
            ww = (torch.rand(N, H, generator=gq) * H ** -0.5).to(device)
            ex = cp.decode_step(cache, [seq], qq, ww, q_lat, K, scale, "exact", check=False)
            un = cp.decode_step(cache, [seq], qq, ww, q_lat, K, scale, mode, check=False)
            total += cp.selection_recall(ex.positions, cp.gather_selection(un.positions))
            err += ((un.out.double() - ex.out.double()).norm() / ex.out.double().norm()).item()
        n = max(args.recall_queries, 1)
        return total / n, err / n

    configs = [(m, False) for m in MODES] + ([("exact", True)] if Hq % W == 0 and W > 1 else [])
    for mode, scatter in configs:
        stats = cp.CommStats()
        step = lambda: cp.decode_step(cache, [seq], q, w, q_lat, K, scale, mode,  # noqa: E731
                                      check=False, scatter_heads=scatter)
        cp.decode_step(cache, [seq], q, w, q_lat, K, scale, mode, stats=stats, check=False,
                       scatter_heads=scatter)
        sec, _ = _timed(step, device, args.reps)
        recall, out_err = (1.0, 0.0) if mode == "exact" else recall_over_queries(mode)
        vllm_exact = (W - 1) * N * K * 8       # received per rank: (W-1) ranks x K x (4 + 4) B
        rows.append(dict(kind="decode", W=W, mode=mode + ("+scatter" if scatter else ""),
                         context=L, topk=K, n_new=N, heads=Hq,
                         index_heads=H, us=sec * 1e6, sent_bytes=stats.sent,
                         received_bytes=stats.received,
                         candidate_bytes=sum(c[2] for c in stats.calls if "candidates" in c[0]),
                         vllm_exact_candidate_bytes=vllm_exact if W > 1 else 0,
                         recall=recall, out_rel_err=out_err))

    T = args.prefill_tokens
    gp = torch.Generator().manual_seed(1)
    mine = cp.zigzag_positions(T, W, rank)
    qi = (torch.randn(T, H, D, generator=gp) * 4).to(torch.float8_e4m3fn)[mine].to(device)
    wi = (torch.rand(T, H, generator=gp) * H ** -0.5)[mine].to(device)
    kf, ksc = dsa_ext.fp8_quantize(torch.randn(T, D, generator=gp).bfloat16(), D)
    kf, ksc = kf[mine].to(device), ksc.reshape(T)[mine].to(device)
    ql = torch.randn(T, Hq, 576, generator=gp).bfloat16()[mine].to(device)
    kv = torch.randn(T, 576, generator=gp).bfloat16()[mine].to(device)
    stats = cp.CommStats()
    with torch.no_grad():
        cp.prefill(qi, wi, kf, ksc, ql, kv, T, K, scale, stats=stats, check=False)
        sec, _ = _timed(lambda: cp.prefill(qi, wi, kf, ksc, ql, kv, T, K, scale, check=False),
                        device, max(1, args.reps // 4))
    rows.append(dict(kind="prefill", W=W, mode="exact", context=T, topk=K, heads=Hq,
                     index_heads=H, us=sec * 1e6, us_per_token=sec * 1e6 / T,
                     sent_bytes=stats.sent, received_bytes=stats.received,
                     received_bytes_per_token=stats.received / T))
    return rows


def _print(rows, file=sys.stdout):
    print(f"{'kind':8} {'W':>2} {'mode':14} {'ctx':>7} {'K':>5} {'time us':>11} {'us/token':>9} "
          f"{'sent B':>10} {'recv B':>10} {'vLLM-exact cand B':>17} {'recall':>7} {'out err':>8}", file=file)
    for r in rows:
        print(f"{r['kind']:8} {r['W']:>2} {r['mode']:14} {r['context']:>7} {r['topk']:>5} "
              f"{r['us']:>11.1f} {r.get('us_per_token', float('nan')):>9.2f} {r['sent_bytes']:>10} "
              f"{r['received_bytes']:>10} {r.get('vllm_exact_candidate_bytes', 0):>17} "
              f"{r.get('recall', float('nan')):>7.4f} {r.get('out_rel_err', float('nan')):>8.2e}",
              file=file)


def _worker(rank, W, store, args, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    try:
        rows = run_rows(args, torch.device("cpu"))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--context", type=int, default=16384, help="decode context length")
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--n-new", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="MLA query heads (per TP shard)")
    p.add_argument("--index-heads", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--recall-queries", type=int, default=8,
                   help="random decode queries the union modes' recall is averaged over")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:           # torchrun
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
            if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rows = run_rows(args, device)
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        import torch.multiprocessing as mp
        rows = []
        for W in args.world_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                out_path = os.path.join(tmp, "rows.json")
                mp.start_processes(_worker, args=(W, os.path.join(tmp, "store"), args, out_path),
                                   nprocs=W, join=True, start_method="spawn")
                with open(out_path) as f:
                    rows += json.load(f)
            print(f"W={W} done", file=sys.stderr)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
