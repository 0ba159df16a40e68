"""dsa_ext.context_parallel against the single-rank ops, across W gloo processes on the CPU.

Every rank draws the same seeded data, runs the context-parallel path on its shard and the
single-rank ops on the unsharded data, and asserts that its results match: the selected
positions identical as sets (ties, ragged lengths not divisible by W, empty shards,
N > 1 queries per step), out/lse within bf16 tolerance, prefill gradients, the union modes
against attention over the union of the selections, and bad input raising the same error on
every rank. One spawn per world size runs all cases (process start-up dominates); a
process group timeout and a join deadline keep a failure from hanging the suite.
"""
from __future__ import annotations

import datetime
import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dsa_ext  # noqa: F401
from dsa_ext import context_parallel as cp
from dsa_ext.paged_cache import PagedDSACache

SPAWN_DEADLINE_S = 90
SM_SCALE = 576 ** -0.5
IDX_H, IDX_D, HQ = 4, 64, 4


# ---------------------------------------------------------------- process harness

def _entry(rank, world_size, store, body):
    if os.path.exists("/sys/class/net/lo"):
        # loopback: no dependence on the host name resolving to a reachable interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    try:
        body(rank, world_size)
    finally:
        dist.destroy_process_group()


def _spawn(body, world_size):
    if world_size == 1:               # in this process: no start-up cost
        threads = torch.get_num_threads()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                _entry(0, 1, os.path.join(tmp, "store"), body)
        finally:
            torch.set_num_threads(threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world_size, os.path.join(tmp, "store"), body),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    pytest.fail(f"context-parallel workers (W={world_size}) did not finish in "
                                f"{SPAWN_DEADLINE_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


# ---------------------------------------------------------------- data

def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _index_keys(n, gen, ties):
    k = torch.randn(n, IDX_D, generator=gen)
    if ties and n > 2:
        # duplicated keys score exactly alike: equal logits at different positions
        k[1::3] = k[0:n - 1:3][: k[1::3].shape[0]]
    return k.bfloat16()


def _same_sets(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    for ra, rb in zip(a, b):
        assert sorted(ra[ra >= 0].tolist()) == sorted(rb[rb >= 0].tolist())


def _close(out, ref, lse, ref_lse):
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-4, rtol=1e-5)


def _full_slots(full, seq_ids, positions):
    """Global positions [B, N, M] -> the single-rank cache's slot ids."""
    B = len(seq_ids)
    return torch.ops.dsa.topk_slot_ids(positions.reshape(B, -1, positions.shape[-1]).contiguous(),
                                       full.block_table(seq_ids), full.block_size)


# ---------------------------------------------------------------- decode

DECODE_CASES = [
    # (context lengths after the step, n_new, topk, ties, kv dtype, interleave, block_size)
    ([37, 5], 1, 8, False, "fp8", 1, 4),
    ([50], 2, 16, True, "bf16", 1, 8),
    ([23, 64, 9], 3, 6, True, "fp8", 2, 4),
    ([2, 1], 1, 4, False, "bf16", 1, 4),      # contexts shorter than W: empty shards
    ([40], 1, 64, False, "fp8", 1, 4),        # K > context: every position, then -1
]


def _build_caches(rank, W, lens, n_new, kv_dtype, interleave, block_size, gen, ties):
    nblk = sum(-(-L // block_size) for L in lens) + 2
    full = PagedDSACache(nblk, block_size, IDX_D, kv_cache_dtype=kv_dtype)
    shard = cp.ShardedDSACache(nblk, block_size, IDX_D, kv_cache_dtype=kv_dtype,
                               interleave=interleave)
    seqs = [full.add_sequence() for _ in lens]
    assert [shard.add_sequence() for _ in lens] == seqs
    # prompt, then the step's new tokens written separately (the decode write path)
    for phase in (0, 1):
        counts = [L - n_new if phase == 0 else n_new for L in lens]
        counts = [max(c, 0) for c in counts]
        n = sum(counts)
        ik, kv = _index_keys(n, gen, ties), torch.randn(n, 576, generator=gen).bfloat16()
        starts = [full.seq_len(s) for s in seqs]
        full.append(seqs, counts, ik, kv)
        mapping = shard.append(seqs, counts, ik, kv)
        owners = torch.cat([shard.placement.owner(torch.arange(a, a + c)) for a, c in zip(starts, counts)])
        assert torch.equal(mapping >= 0, owners == rank)     # written on the owning rank only
    for s_id, L in zip(seqs, lens):
        pos = torch.randperm(L, generator=gen)
        slots = shard.slot_mapping(s_id, pos)
        assert torch.equal(slots >= 0, shard.placement.owner(pos) == rank)
        # a rewrite through the local slots lands on the rows the single-rank cache holds
        kv_local = torch.ops.dsa.mla_kv_cache_gather(shard.kv_cache, slots[slots >= 0])
        kv_full = torch.ops.dsa.mla_kv_cache_gather(full.kv_cache, full.slot_ids(s_id)[pos[slots >= 0]])
        assert torch.equal(kv_local, kv_full)
        with pytest.raises(ValueError, match=r"positions must lie in \[0, "):
            shard.slot_mapping(s_id, torch.tensor([L]))
    return full, shard, seqs


def _decode_body(rank, W):
    recalls = []
    for case_id, (lens, n_new, topk, ties, kv_dtype, interleave, bs) in enumerate(DECODE_CASES):
        gen = _gen(100 + case_id)
        full, shard, seqs = _build_caches(rank, W, lens, n_new, kv_dtype, interleave, bs, gen, ties)
        B = len(lens)
        q = (torch.randn(B, n_new, IDX_H, IDX_D, generator=gen) * 4).to(torch.float8_e4m3fn)
        w = torch.rand(B * n_new, IDX_H, generator=gen) + 0.1
        q_lat = torch.randn(B, n_new, HQ, 576, generator=gen).bfloat16()
        sink = torch.randn(HQ, generator=gen)

        # the single-rank pipeline
        bt, cl = full.block_table(seqs), full.context_lens(seqs)
        logits = torch.ops.dsa.paged_indexer_logits(q, full.index_k_cache, w, cl, bt, max(lens), True)
        ke = (cl[:, None] - n_new + 1 + torch.arange(n_new, dtype=torch.int32)).reshape(-1).to(torch.int32)
        ref_pos = torch.ops.dsa.topk_indices(logits, topk, torch.zeros_like(ke), ke, False)
        ref_slots = torch.ops.dsa.topk_slot_ids(ref_pos.view(B, n_new, topk).contiguous(), bt, bs)
        for sink_arg in (None, sink):
            ref_out, ref_lse = torch.ops.dsa.sparse_mla_decode(q_lat, full.kv_cache, ref_slots,
                                                               SM_SCALE, 512, sink_arg, None)
            stats = cp.CommStats()
            res = cp.decode_step(shard, seqs, q, w, q_lat, topk, SM_SCALE, "exact", sink_arg, stats)
            _same_sets(res.positions, ref_pos)
            _close(res.out, ref_out, res.lse, ref_lse)
            R = B * n_new
            cand = W * R * topk * 8
            assert W == 1 and not stats.calls or dict((c[0], c[1]) for c in stats.calls) == {
                "all_gather:candidates": 2 * R * topk * 4, "all_gather:lse": R * HQ * 4,
                "all_reduce:out": R * HQ * 512 * 4}
            assert sum(c[2] for c in stats.calls if c[0] == "all_gather:candidates") == cand - cand // W
            assert stats.received == (W - 1) * (2 * R * topk * 4 + R * HQ * 4) + 2 * (W - 1) * R * HQ * 2048 // W

        # each rank's heads only (Hq = 4: W = 1, 2, 4; W = 3 is refused on every rank)
        if HQ % W == 0:
            res = cp.decode_step(shard, seqs, q, w, q_lat, topk, SM_SCALE, "exact", sink,
                                 scatter_heads=True)
            heads = slice(rank * HQ // W, (rank + 1) * HQ // W)
            _close(res.out, ref_out[:, :, heads], res.lse, ref_lse[:, :, heads])
        else:
            with pytest.raises(ValueError, match="scatter_heads needs q_latent's heads"):
                cp.decode_step(shard, seqs, q, w, q_lat, topk, SM_SCALE, scatter_heads=True)

        # union modes: the output is attention over the union of the ranks' selections
        for mode in ("union", "union_share"):
            res = cp.decode_step(shard, seqs, q, w, q_lat, topk, SM_SCALE, mode)
            k_local = topk if mode == "union" else math.ceil(topk / W)
            assert res.positions.shape == (B, n_new, k_local)
            union = cp.gather_selection(res.positions)
            u_out, u_lse = torch.ops.dsa.sparse_mla_decode(
                q_lat, full.kv_cache, _full_slots(full, seqs, union), SM_SCALE, 512, None, None)
            _close(res.out, u_out, res.lse, u_lse)
            recall = cp.selection_recall(ref_pos, union)
            by_sets = [len(set(e[e >= 0].tolist()) & set(a.tolist())) / (e >= 0).sum().item()
                       for e, a in zip(ref_pos, union.reshape(R, -1)) if (e >= 0).any()]
            assert recall == pytest.approx(sum(by_sets) / len(by_sets))
            if mode == "union":
                assert recall == 1.0        # the local top-Ks contain the global top-K
            recalls.append((mode, recall))
    if rank == 0:
        print("union recall", recalls)


def _bad_input_body(rank, W):
    gen = _gen(7)
    full, shard, seqs = _build_caches(rank, W, [11], 1, "bf16", 1, 4, gen, False)
    q = torch.randn(1, 1, IDX_H, IDX_D, generator=gen).to(torch.float8_e4m3fn)
    w = torch.rand(1, IDX_H, generator=gen)
    q_lat = torch.randn(1, 1, HQ, 576, generator=gen).bfloat16()

    def expect(match, **kw):
        args = dict(cache=shard, seq_ids=seqs, q_index=q, weights=w, q_latent=q_lat, topk=4,
                    sm_scale=SM_SCALE)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            cp.decode_step(**args)

    if W > 1:
        expect("ranks disagree on topk", topk=4 + rank)                   # mismatched arguments
    expect(f"rank {W - 1}: q_index must be", q_index=q if rank != W - 1 else q.float())
    expect("mode must be one of", mode="approx")
    # a cache declared for another placement: the global lengths agree, the local ones do not
    other = cp.ShardedDSACache(8, 4, IDX_D, kv_cache_dtype="bf16", interleave=1)
    s = other.add_sequence()
    other.local.reserve([s], 11)          # every token locally, as if unsharded
    other._global_lens[s] = 11
    if W > 1:                             # (one rank holding everything is the W = 1 layout)
        expect("not sharded as declared", cache=other, seq_ids=[s])
    # a cache declared for another world size (here: W + 1 ranks) than the group's
    wrong = cp.ShardedDSACache(8, 4, IDX_D, kv_cache_dtype="bf16")
    wrong.world_size, wrong.placement = W + 1, cp.TokenPlacement(W + 1)
    s = wrong.add_sequence()
    wrong.append([s], 11, _index_keys(11, gen, False), torch.randn(11, 576, generator=gen).bfloat16())
    expect(f"rank {rank}: cache is sharded for rank {rank} of {W + 1}", cache=wrong, seq_ids=[s])
    # a rank that disagrees on the sequence's global length
    if rank == 0:
        shard._global_lens[seqs[0]] += 1
    expect("global seq lens|not sharded as declared")
    if rank == 0:
        shard._global_lens[seqs[0]] -= 1
    with pytest.raises(ValueError, match="ranks disagree on seq_len" if W > 1 else "must be 3-D"):
        T = 9 + rank if W > 1 else 9
        rows = cp.zigzag_positions(T, W, rank).numel() + (W == 1)
        cp.prefill(torch.zeros(rows, IDX_H, IDX_D).to(torch.float8_e4m3fn), torch.ones(rows, IDX_H),
                   torch.zeros(rows, IDX_D).to(torch.float8_e4m3fn), torch.ones(rows),
                   torch.zeros(rows, HQ, 576).bfloat16(), torch.zeros(rows, 576).bfloat16(),
                   T, 4, SM_SCALE)
    with pytest.raises(ValueError, match=f"rank {W - 1}: k must have this rank's"):
        T = 9
        rows = cp.zigzag_positions(T, W, rank).numel()
        cp.indexer_kl_loss_sparse(torch.randn(rows, IDX_H, IDX_D), torch.randn(rows + (rank == W - 1), IDX_D),
                                  torch.rand(rows, IDX_H), torch.zeros(rows, 4, dtype=torch.int32),
                                  torch.rand(rows, 4), T)
    # without the agreement every rank raises its own error locally
    with pytest.raises(ValueError, match="mode must be one of"):
        cp.decode_step(shard, seqs, q, w, q_lat, 4, SM_SCALE, mode="approx", check=False)
    # after every error the group still works, with or without the agreement
    a = cp.decode_step(shard, seqs, q, w, q_lat, 4, SM_SCALE)
    b = cp.decode_step(shard, seqs, q, w, q_lat, 4, SM_SCALE, check=False)
    assert torch.equal(a.out, b.out) and torch.equal(a.positions, b.positions)


# ---------------------------------------------------------------- prefill

PREFILL_CASES = [(29, 8), (5, 4), (64, 16)]     # (T, topk); T=5 < 2W leaves empty chunks


def _prefill_body(rank, W):
    for case_id, (T, topk) in enumerate(PREFILL_CASES):
        gen = _gen(300 + case_id)
        q = (torch.randn(T, IDX_H, IDX_D, generator=gen) * 4).to(torch.float8_e4m3fn)
        w = torch.rand(T, IDX_H, generator=gen) + 0.1
        k_fp8, k_scale = dsa_ext.fp8_quantize(_index_keys(T, gen, ties=case_id == 0), IDX_D)
        k_scale = k_scale.reshape(T)
        q_lat = torch.randn(T, HQ, 576, generator=gen).bfloat16()
        kv = torch.randn(T, 576, generator=gen).bfloat16()
        dout = torch.randn(T, HQ, 512, generator=gen).bfloat16()

        ks = torch.zeros(T, dtype=torch.int32)
        ke = torch.arange(1, T + 1, dtype=torch.int32)
        ref_idx = torch.ops.dsa.indexer_topk(q, k_fp8, k_scale, w, ks, ke, topk, False, 1 << 28)
        q_ref, kv_ref = q_lat.clone().requires_grad_(), kv.clone().requires_grad_()
        ref_out, ref_lse = dsa_ext.sparse_mla(q_ref, kv_ref.unsqueeze(1), ref_idx.unsqueeze(1), SM_SCALE)
        (ref_out.float() * dout.float()).sum().backward()

        mine = cp.zigzag_positions(T, W, rank)
        q_cp = q_lat[mine].clone().requires_grad_()
        kv_cp = kv[mine].clone().requires_grad_()
        stats = cp.CommStats()
        res = cp.prefill(q[mine], w[mine], k_fp8[mine], k_scale[mine], q_cp, kv_cp, T, topk,
                         SM_SCALE, stats=stats)
        _same_sets(res.indices, ref_idx[mine])
        _close(res.out, ref_out[mine].detach(), res.lse, ref_lse[mine].detach())
        (res.out.float() * dout[mine].float()).sum().backward()
        torch.testing.assert_close(q_cp.grad.float(), q_ref.grad[mine].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(kv_cp.grad.float(), kv_ref.grad[mine].float(), atol=2e-2, rtol=2e-2)
        # indexer training (sparse stage): the ranks' loss terms sum to the single-rank loss,
        # and the gradients of q, weights and the rank's own keys are the single-rank ones
        qt = torch.randn(T, IDX_H, IDX_D, generator=gen)
        kt = torch.randn(T, IDX_D, generator=gen)
        wt = torch.rand(T, IDX_H, generator=gen)
        ref_target = dsa_ext.sparse_attention_target(q_lat, kv.unsqueeze(1), ref_idx.unsqueeze(1),
                                                     ref_lse.detach(), SM_SCALE)
        leaves = [x.clone().requires_grad_() for x in (qt, kt, wt)]
        ref_loss = dsa_ext.indexer_kl_loss_sparse(leaves[0], leaves[1], leaves[2],
                                                  ref_idx.unsqueeze(1), ref_target)
        ref_loss.backward()
        target = dsa_ext.sparse_attention_target(q_lat[mine], res.kv.detach(), res.indices.unsqueeze(1),
                                                 res.lse.detach(), SM_SCALE)
        torch.testing.assert_close(target, ref_target[mine], atol=1e-5, rtol=1e-4)
        mine_leaves = [x[mine].clone().requires_grad_() for x in (qt, kt, wt)]
        loss = cp.indexer_kl_loss_sparse(mine_leaves[0], mine_leaves[1], mine_leaves[2],
                                         res.indices, target, T)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, ref_loss.detach(), atol=1e-4, rtol=1e-4)
        for got, ref in zip(mine_leaves, leaves):
            torch.testing.assert_close(got.grad, ref.grad[mine], atol=1e-5, rtol=1e-4)

        padded = max(cp.zigzag_positions(T, W, r).numel() for r in range(W))
        assert W == 1 and not stats.calls or [c[:2] for c in stats.calls[:3]] == [
            ("all_gather:rows", padded * (IDX_D + 4)), ("all_gather:rows", padded * 576 * 2),
            ("reduce_scatter:row grads", W * padded * 576 * 4)]


def _bench_body(rank, W):
    """The bench's rows (dsa_ext.bench.context_parallel.run_rows, small shapes): one per mode
    and the prefill, with the byte counts of the collectives each one issues."""
    import argparse
    from dsa_ext.bench import context_parallel as bench
    K, Hq = 32, 4
    args = argparse.Namespace(context=300, topk=K, n_new=1, heads=Hq, index_heads=8,
                              prefill_tokens=64, reps=1, recall_queries=1)
    rows = {r["mode"] if r["kind"] == "decode" else "prefill": r
            for r in bench.run_rows(args, torch.device("cpu"))}
    assert set(rows) == {"exact", "union", "union_share", "exact+scatter", "prefill"}
    combine = (W - 1) * Hq * 4 + 2 * (W - 1) * Hq * 512 * 4 // W
    assert rows["exact"]["received_bytes"] == (W - 1) * K * 8 + combine
    assert rows["exact"]["candidate_bytes"] == rows["exact"]["vllm_exact_candidate_bytes"]
    assert rows["union"]["received_bytes"] == rows["union_share"]["received_bytes"] == combine
    assert rows["exact+scatter"]["received_bytes"] == (W - 1) * K * 8 + (W - 1) * Hq * 4 + \
        (W - 1) * (Hq // W) * 512 * 4
    assert rows["union"]["recall"] == 1.0 and 0.0 < rows["union_share"]["recall"] <= 1.0
    rows_per_rank = max(cp.zigzag_positions(64, W, r).numel() for r in range(W))
    assert rows["prefill"]["received_bytes"] == (W - 1) * rows_per_rank * (128 + 4 + 576 * 2)


def _all_bodies(rank, W):
    _decode_body(rank, W)
    _prefill_body(rank, W)
    _bad_input_body(rank, W)
    if W == 2:
        _bench_body(rank, W)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_context_parallel_matches_single_rank(world_size):
    _spawn(_all_bodies, world_size)


def test_placement_round_trip_and_balance():
    for W, I in ((1, 1), (3, 1), (4, 2), (3, 5)):
        P = cp.TokenPlacement(W, I)
        p = torch.arange(200)
        owner, local = P.owner(p), P.local_position(p)
        for r in range(W):
            mine = p[owner == r]
            assert torch.equal(P.global_position(r, local[owner == r]), mine)
            assert torch.equal(local[owner == r], torch.arange(mine.numel()))   # dense, increasing
            for L in (0, 1, 7, 199, 200):
                assert P.local_count(L, r) == int((mine < L).sum())
                assert P.local_count(torch.tensor([L]), r).item() == int((mine < L).sum())
        counts = [P.local_count(137, r) for r in range(W)]
        assert max(counts) - min(counts) <= I


def test_zigzag_covers_every_position_once_and_balances_causal_work():
    for T, W in ((29, 2), (5, 3), (1000, 4), (0, 2)):
        parts = [cp.zigzag_positions(T, W, r) for r in range(W)]
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(T))
        work = [float((p + 1).sum()) for p in parts]
        if T >= 1000:
            assert max(work) / min(work) < 1.01


def test_merge_topk_candidates_matches_topk_indices():
    g = _gen(5)
    S, k = 300, 17
    logits = torch.randint(-4, 4, (6, S), generator=g).float()      # many ties
    logits[0, 5] = float("nan")
    logits[1, :] = float("-inf")
    ref = torch.ops.dsa.topk_indices(logits, k, None, None, False)
    # the candidates of 3 shards, each its local top-k, positions shuffled in the list
    cand_v, cand_p = [], []
    for r in range(3):
        cols = torch.arange(r, S, 3)
        loc = torch.ops.dsa.topk_indices(logits[:, cols].contiguous(), k, None, None, False)
        cand_p.append(cols[loc.long()])
        cand_v.append(logits.gather(1, cand_p[-1]))
    perm = torch.randperm(3 * k, generator=g)
    got = cp.merge_topk_candidates(torch.cat(cand_v, 1)[:, perm], torch.cat(cand_p, 1)[:, perm], k)
    _same_sets(got, ref)
