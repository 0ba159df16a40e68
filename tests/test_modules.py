"""The nn.Modules (dsa_ext.modules) and the paged cache manager (dsa_ext.paged_cache) against the
dense masked formulation (dsa_ext.reference.dense), on small sizes.

The indexer is compared with a dense reference computed from the module's own quantised
tensors (so FP8 rounding is not in the comparison, only the op path), the attention exactly
given the same indices, and a decode step with the prefill's last row. Tests needing an op
that has no CPU kernel yet are skipped.
"""
import math

import pytest
import torch

import dsa_ext
from dsa_ext.modules import (DSAPath, LightningIndexer, SparseMLAAttention, apply_rope_neox,
                             hadamard_transform, ragged_causal_ranges, rope_cos_sin)
from dsa_ext.paged_cache import PagedDSACache
from dsa_ext.reference.dense import (causal_ranges, dense_indexer_logits, dense_masked_mla_attention,
                                     dense_topk_mask, ranges_to_mask)

from conftest import randn, rel_err


def needs_ops(*names):
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa::{n}", "CPU")]
    return pytest.mark.skipif(bool(missing), reason=f"ops without a CPU kernel yet: {missing}")


def sparse_mla_landed():
    from dsa_ext.ops import sparse_mla as mod
    return callable(getattr(mod, "sparse_mla", mod))


needs_sparse_mla = pytest.mark.skipif(not sparse_mla_landed(), reason="dsa_ext.sparse_mla not landed yet")

# indexer_topk may be built on indexer_logits, so the prefill indexer needs both.
INDEXER = ("fp8_quantize", "hadamard_fp8_quantize", "indexer_logits", "indexer_topk")
CACHE = ("fp8_quantize", "indexer_k_cache_write", "indexer_k_cache_gather", "mla_kv_cache_write", "mla_kv_cache_gather")
DECODE = ("paged_indexer_logits", "topk_indices", "topk_slot_ids", "sparse_mla_decode")

SMALL = dict(dim=96, q_lora_rank=48, n_heads=4, head_dim=128, rope_dim=64)
H_ATTN, D_QK, D_V = 4, 576, 512


def make_inputs(T, gen, dim=SMALL["dim"], q_lora_rank=SMALL["q_lora_rank"], start=0):
    x = randn(T, dim, gen=gen)
    qr = randn(T, q_lora_rank, gen=gen)
    cos, sin = rope_cos_sin(torch.arange(start, start + T), SMALL["rope_dim"])
    q_latent = randn(T, H_ATTN, D_QK, gen=gen, dtype=torch.bfloat16)
    kv_latent = randn(T, D_QK, gen=gen, dtype=torch.bfloat16)
    return x, qr, q_latent, kv_latent, cos, sin     # DSAPath's argument order


def make_path(gen, topk):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return DSAPath(softmax_scale=D_QK ** -0.5, topk=topk, **SMALL).eval()


def indices_to_mask(indices, num_keys):
    """[T, K] int32 (-1 = none) -> [T, S] bool; a repeated index would be lost, so assert none."""
    idx = indices.long()
    mask = torch.zeros(idx.shape[0], num_keys + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(idx < 0, num_keys, idx), True)
    valid = idx >= 0
    assert all(torch.unique(r[v]).numel() == int(v.sum()) for r, v in zip(idx, valid)), "repeated index"
    return mask[:, :num_keys]


def assert_topk_selection(indices, logits, k, valid, atol=1e-4):
    """The selected columns are a top-k of `logits` within `valid`: the right count per row, and
    their values equal the k largest ones (so only exact ties could be swapped)."""
    got = indices_to_mask(indices, logits.shape[1])
    ref = dense_topk_mask(logits, k, valid)
    assert torch.equal(got.sum(1), ref.sum(1))
    assert not (got & ~valid).any(), "selected a key outside the row's range"
    neg = torch.tensor(float("-inf"))
    got_vals = torch.where(got, logits, neg).sort(dim=1, descending=True).values[:, :k]
    ref_vals = torch.where(ref, logits, neg).sort(dim=1, descending=True).values[:, :k]
    finite = ref_vals.isfinite()
    torch.testing.assert_close(got_vals[finite], ref_vals[finite], atol=atol, rtol=1e-4)
    assert (got_vals.isfinite() == finite).all()
    return got


# ---------------------------------------------------------------- rope, Hadamard (no ops needed)

@pytest.mark.parametrize("n", [1, 2, 64, 128])
def test_hadamard_matches_sylvester_matrix(n, gen):
    x = randn(5, 3, n, gen=gen)
    ref = (x.double() @ dsa_ext.reference.hadamard_matrix(n)) * n ** -0.5
    out = hadamard_transform(x, n ** -0.5)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # orthonormal: dot products are preserved
    torch.testing.assert_close((out[0] * out[1]).sum(-1), (x[0] * x[1]).sum(-1), atol=1e-4, rtol=1e-4)


def test_hadamard_rejects_non_power_of_two(gen):
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(randn(2, 96, gen=gen))


def test_rope_is_neox_halves_not_interleaved(gen):
    T, r = 7, 64
    x = randn(T, 3, r, gen=gen)
    cos, sin = rope_cos_sin(torch.arange(T) + 5, r)
    out = apply_rope_neox(x, cos, sin)
    # V3.2 (fixed) apply_rotary_emb(interleaved=False): complex numbers from (first half, second half).
    xc = torch.complex(x[..., : r // 2].double(), x[..., r // 2:].double())
    freqs = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))
    yc = xc * freqs[:, None, :]
    torch.testing.assert_close(out.double(), torch.cat((yc.real, yc.imag), -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-4)


def test_ragged_causal_ranges():
    ks, ke = ragged_causal_ranges(torch.tensor([0, 3, 3, 5], dtype=torch.int32))
    assert ks.tolist() == [0, 0, 0, 3, 3] and ke.tolist() == [1, 2, 3, 4, 5]
    assert ks.dtype == ke.dtype == torch.int32


def test_indexer_project_matches_v32_structure(gen):
    """project() = wq_b / wk + k_norm, NeoX rope on the first 64 dims; keys also rotated by the
    Hadamard transform * 128**-0.5 (the queries are rotated by the fused quantiser)."""
    torch.manual_seed(0)
    idx = LightningIndexer(**SMALL)
    x, qr, _, _, cos, sin = make_inputs(9, gen)
    q, k = idx.project(x, qr, cos, sin)
    H = hadamard_transform(torch.eye(128, dtype=torch.float64))  # Sylvester matrix
    qn = (qr.double() @ idx.wq_b.weight.double().T).view(9, 4, 128)
    kn = torch.nn.functional.layer_norm(x.double() @ idx.wk.weight.double().T, (128,),
                                        idx.k_norm.weight.double(), idx.k_norm.bias.double())
    rot = lambda t: torch.cat((apply_rope_neox(t[..., :64], cos.double(), sin.double()), t[..., 64:]), -1)
    torch.testing.assert_close(q.double(), rot(qn), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k.double(), rot(kn) @ H / math.sqrt(128), atol=1e-4, rtol=1e-4)


def test_indexer_rejects_bad_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        LightningIndexer(dim=8, q_lora_rank=8, n_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="rope_dim"):
        LightningIndexer(dim=8, q_lora_rank=8, n_heads=2, rope_dim=63)


# ---------------------------------------------------------------- the indexer through the ops

@needs_ops("hadamard_fp8_quantize")
def test_indexer_query_quantisation_is_rotation_then_fp8(gen):
    """The fused rotate-and-quantise of the queries gives the bytes of hadamard_transform then
    the reference fp8_quantize (block 128, ue8m0)."""
    torch.manual_seed(3)
    idx = LightningIndexer(**SMALL)
    x, qr, _, _, cos, sin = make_inputs(10, gen)
    q, _ = idx.project(x, qr, cos, sin)
    q_fp8, w = idx.quantize_query(x, q)
    ref_fp8, ref_scale = dsa_ext.reference.fp8_quantize(hadamard_transform(q.float(), 128 ** -0.5), 128, True)
    assert torch.equal(q_fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    torch.testing.assert_close(w, idx.weights_proj(x) * (4 ** -0.5 * 128 ** -0.5) * ref_scale[..., 0],
                               atol=0, rtol=1e-6)


@needs_ops("fp8_quantize", "hadamard_fp8_quantize")
def test_indexer_quantisation_folds_scales(gen):
    """weights = weights_proj(x) * H**-0.5 * q_scale * D**-0.5: the FP8 logits approximate the
    unquantised ones computed with the plain head weights."""
    torch.manual_seed(1)
    idx = LightningIndexer(**SMALL)
    T = 24
    x, qr, _, _, cos, sin = make_inputs(T, gen)
    q, k = idx.project(x, qr, cos, sin)
    q_fp8, k_fp8, k_scale, w = idx.quantized_inputs(x, qr, cos, sin)
    assert q_fp8.dtype == k_fp8.dtype == torch.float8_e4m3fn and w.dtype == torch.float32
    assert q_fp8.shape == (T, 4, 128) and k_fp8.shape == (T, 128) and k_scale.shape == (T,) and w.shape == (T, 4)
    quantised = dense_indexer_logits(q_fp8.float(), k_fp8.float(), w, k_scale)
    plain_w = idx.weights_proj(x) * (4 ** -0.5 * 128 ** -0.5)
    exact = dense_indexer_logits(hadamard_transform(q.float(), 128 ** -0.5), k.float(), plain_w)
    finite = exact.isfinite()
    assert torch.equal(finite, quantised.isfinite())
    assert rel_err(quantised[finite], exact[finite]) < 0.1


@needs_ops(*INDEXER)
@pytest.mark.parametrize("T,topk", [(40, 8), (17, 32)])
def test_indexer_matches_dense_from_same_quantised_tensors(T, topk, gen):
    torch.manual_seed(2)
    idx = LightningIndexer(topk=topk, **SMALL)
    x, qr, _, _, cos, sin = make_inputs(T, gen)
    q_fp8, k_fp8, k_scale, w = idx.quantized_inputs(x, qr, cos, sin)
    ref = dense_indexer_logits(q_fp8.float(), k_fp8.float(), w, k_scale)
    logits = idx.logits(x, qr, cos, sin)
    finite = ref.isfinite()
    assert torch.equal(logits.isfinite(), finite)
    torch.testing.assert_close(logits[finite], ref[finite], atol=1e-4, rtol=1e-4)
    indices = idx(x, qr, cos, sin)
    k = min(topk, T)
    assert indices.shape == (T, k) and indices.dtype == torch.int32
    assert_topk_selection(indices, ref, k, finite)


# ---------------------------------------------------------------- attention and the composed path

@needs_sparse_mla
@needs_ops("sparse_mla_fwd")
def test_sparse_attention_equals_dense_masked_given_same_indices(gen):
    T, S, K = 12, 50, 16
    q = randn(T, H_ATTN, D_QK, gen=gen, dtype=torch.bfloat16)
    kv = randn(S, D_QK, gen=gen, dtype=torch.bfloat16)
    indices = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(T)]).int()
    indices[0, 5:] = -1       # short row
    indices[1, :] = -1        # empty row: out 0, lse -inf
    attn = SparseMLAAttention(softmax_scale=0.05)
    out, lse = attn(q, kv, indices)
    ref_out, ref_lse = dense_masked_mla_attention(q, kv, indices_to_mask(indices, S), 0.05)
    assert out.shape == (T, H_ATTN, D_V) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@needs_sparse_mla
@needs_ops(*INDEXER, "sparse_mla_fwd")
def test_dsa_path_prefill_equals_dense_step(gen):
    T, topk = 48, 12
    path = make_path(gen, topk)
    x, qr, q_lat, kv_lat, cos, sin = make_inputs(T, gen)
    result = path(x, qr, q_lat, kv_lat, cos, sin)
    q_fp8, k_fp8, k_scale, w = path.indexer.quantized_inputs(x, qr, cos, sin)
    logits = dense_indexer_logits(q_fp8.float(), k_fp8.float(), w, k_scale)
    valid = ranges_to_mask(*causal_ranges(T, T), T)
    mask = assert_topk_selection(result.indices, logits, topk, valid)
    ref_out, ref_lse = dense_masked_mla_attention(q_lat, kv_lat, mask, D_QK ** -0.5)
    assert rel_err(result.out, ref_out) < 1e-2
    torch.testing.assert_close(result.lse, ref_lse, atol=1e-3, rtol=1e-3)
    # early rows see fewer than topk keys: they attend to every causal key, as dense attention does
    full_out, _ = dense_masked_mla_attention(q_lat[:topk], kv_lat[:topk], valid[:topk, :topk], D_QK ** -0.5)
    assert rel_err(result.out[:topk], full_out) < 1e-2


@needs_sparse_mla
@needs_ops(*INDEXER, "sparse_mla_fwd")
def test_dsa_path_ragged_batch_equals_separate_sequences(gen):
    path = make_path(gen, topk=6)
    lens = [13, 1, 20]
    seqs = [make_inputs(n, gen) for n in lens]
    batched = [torch.cat([s[i] for s in seqs]) for i in range(6)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    result = path(*batched, cu_seqlens=cu)
    for seq, start, n in zip(seqs, cu[:-1].tolist(), lens):
        alone = path(*seq)
        torch.testing.assert_close(result.out[start:start + n], alone.out, atol=1e-2, rtol=1e-2)
        got = result.indices[start:start + n]
        assert ((got < 0) | ((got >= start) & (got < start + n))).all(), "a key from another sequence"
        # the same keys as the sequence alone (positions shifted by its start; a sequence
        # shorter than topk alone returns min(topk, n) columns, the batch pads them with -1)
        local = torch.where(got < 0, got, got - start)
        want = torch.nn.functional.pad(alone.indices, (0, got.shape[1] - alone.indices.shape[1]), value=-1)
        assert torch.equal(local.sort(-1).values, want.sort(-1).values)


@needs_sparse_mla
@needs_ops(*INDEXER, "sparse_mla_fwd")
def test_dsa_path_is_differentiable_in_the_latents(gen):
    path = make_path(gen, topk=6)
    x, qr, q_lat, kv_lat, cos, sin = make_inputs(20, gen)
    q_lat.requires_grad_(True)
    kv_lat.requires_grad_(True)
    out = path(x, qr, q_lat, kv_lat, cos, sin).out
    out.float().square().sum().backward()
    assert q_lat.grad is not None and q_lat.grad.abs().sum() > 0
    assert kv_lat.grad is not None and kv_lat.grad.abs().sum() > 0


# ---------------------------------------------------------------- the paged cache manager

def test_paged_cache_allocation_and_tables():
    cache = PagedDSACache(num_blocks=6, block_size=4, kv_cache_dtype="bf16")
    a, b = cache.add_sequence(), cache.add_sequence()
    slots = cache.reserve([a, b], [5, 3])
    assert slots.dtype == torch.int64 and slots.numel() == 8
    table = cache.block_table([a, b])
    assert table.dtype == torch.int32 and table.shape == (2, 2)
    for seq, seq_slots in ((a, slots[:5]), (b, slots[5:])):
        pos = torch.arange(seq_slots.numel())
        row = cache.block_table([seq])[0].long()
        assert torch.equal(seq_slots, row[pos // 4] * 4 + pos % 4)
        assert torch.equal(cache.slot_ids(seq), seq_slots)
    assert set(table[0, :2].tolist()).isdisjoint(table[1, :1].tolist())
    assert cache.context_lens([b, a]).tolist() == [3, 5]
    # growing a sequence keeps its old slots and continues in its last block
    more = cache.reserve([b], 2)
    assert more.tolist() == [int(slots[7]) + 1, cache.block_table([b])[0, 1].item() * 4 + 0]
    # full: nothing is allocated
    free = cache.free_blocks
    with pytest.raises(RuntimeError, match="full"):
        cache.reserve([a], 100)
    assert cache.free_blocks == free and cache.seq_len(a) == 5
    cache.free_sequence(a)
    assert cache.free_blocks == free + 2
    with pytest.raises(KeyError):
        cache.seq_len(a)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PagedDSACache(4, kv_cache_dtype="fp16")


@needs_ops(*CACHE)
@pytest.mark.parametrize("kv_cache_dtype", ["bf16", "fp8"])
def test_paged_cache_round_trip(kv_cache_dtype, gen):
    cache = PagedDSACache(num_blocks=8, block_size=4, kv_cache_dtype=kv_cache_dtype)
    assert cache.index_k_cache.shape == (8, 4, 1, 132) and cache.index_k_cache.dtype == torch.uint8
    assert cache.kv_cache.shape == ((8, 4, 1, 656) if kv_cache_dtype == "fp8" else (8, 4, 1, 576))
    seqs = [cache.add_sequence() for _ in range(3)]
    lens = {s: n for s, n in zip(seqs, (6, 1, 9))}
    keys = {s: randn(n, 128, gen=gen, dtype=torch.bfloat16) for s, n in lens.items()}
    rows = {s: randn(n, 576, gen=gen, dtype=torch.bfloat16) for s, n in lens.items()}
    # interleave writes: prefill of two sequences, then one token, then the rest
    cache.append(seqs[:2], [5, 1], torch.cat([keys[seqs[0]][:5], keys[seqs[1]]]),
                 torch.cat([rows[seqs[0]][:5], rows[seqs[1]]]))
    cache.append([seqs[2]], [9], keys[seqs[2]], rows[seqs[2]])
    cache.append([seqs[0]], [1], keys[seqs[0]][5:], rows[seqs[0]][5:])
    k_fp8, k_scale = cache.gather_index_k(seqs)
    ref_fp8, ref_scale = LightningIndexer.quantize_key(torch.cat([keys[s] for s in seqs]))
    assert torch.equal(k_fp8.view(torch.uint8), ref_fp8.view(torch.uint8))
    assert torch.equal(k_scale, ref_scale)
    for s in seqs:
        kv = cache.gather_kv(s)
        assert kv.shape == (lens[s], 1, 576) and kv.dtype == torch.bfloat16
        if kv_cache_dtype == "bf16":
            assert torch.equal(kv[:, 0], rows[s])
        else:
            assert rel_err(kv[:, 0], rows[s]) < 0.05
            assert torch.equal(kv[:, 0, 512:], rows[s][:, 512:])   # rope part stays bf16


@needs_sparse_mla
@needs_ops(*INDEXER, "sparse_mla_fwd", *CACHE, *DECODE)
@pytest.mark.parametrize("kv_cache_dtype,n_new", [("bf16", 1), ("bf16", 2), ("fp8", 1)])
def test_decode_step_matches_prefill_last_rows(kv_cache_dtype, n_new, gen):
    """Prefill T - n_new tokens into the paged cache, decode the last n_new: same rows as a
    prefill of all T (two sequences in the batch, different lengths, to exercise block tables)."""
    path = make_path(gen, topk=10)
    lens = [29, 14]
    seqs = [make_inputs(n, gen) for n in lens]
    cache = PagedDSACache(num_blocks=16, block_size=4, kv_cache_dtype=kv_cache_dtype)
    ids = [cache.add_sequence() for _ in lens]
    for sid, seq, n in zip(ids, seqs, lens):
        path(*[t[: n - n_new] for t in seq], cache=cache, seq_ids=[sid])
    new = [torch.cat([seq[i][n - n_new:] for seq, n in zip(seqs, lens)]) for i in range(6)]
    step = path.decode_step(*new, cache=cache, seq_ids=ids, n_new=n_new)
    assert step.out.shape == (2, n_new, H_ATTN, D_V) and step.indices.shape[:2] == (2, n_new)
    tol = 1e-2 if kv_cache_dtype == "bf16" else 6e-2
    for b, (seq, n) in enumerate(zip(seqs, lens)):
        full = path(*seq)
        assert rel_err(step.out[b], full.out[n - n_new:]) < tol
        # the selected slots are those of the prefill's selected positions
        slots = cache.slot_ids(ids[b])
        want = torch.where(full.indices[n - n_new:] < 0, -1, slots[full.indices[n - n_new:].long().clamp_min(0)])
        assert torch.equal(step.indices[b].sort(-1).values.long(), want.sort(-1).values)


@needs_sparse_mla
@needs_ops(*INDEXER, "sparse_mla_fwd")
def test_dsa_path_prefill_traces_with_fullgraph(gen):
    """The prefill path compiles as one graph (fake kernels of every op it calls; aot_eager runs
    it through fake tensors) and gives the eager result."""
    path = make_path(gen, topk=8)
    inputs = make_inputs(30, gen)
    compiled = torch.compile(path, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(*inputs), path(*inputs)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
