"""DeepSeek-V4 attention layers (dsa_ext.v4, SPEC section 10): a tiny random-weight layer of each
kind (swa, csa, hca) whose prefill equals its token-by-token paged decode (ragged batches,
lengths not a multiple of the ratio, windows longer and shorter than a sequence), prefill
followed by decode, the module against the float64 dense masked reference
(dsa_ext.reference.v4_attention), GLM-5-style shared-indexer reuse, and bad inputs."""
import pytest
import torch

import dsa_ext
import dsa_ext.v4 as v4mod
from dsa_ext import reference as ref
from dsa_ext.v4 import V4Attention, V4LayerCache

DIM = 64
SMALL = dict(dim=DIM, n_heads=4, q_lora_rank=32, o_groups=2, o_lora_rank=16, window=16,
             index_heads=4, index_topk=3, rope_base=50.0, max_positions=512, dtype=torch.float32)
# kind -> ratio used by the fast tests (hca's 128 has its own test below)
KINDS = {"swa": None, "csa": 4, "hca": 8}


def make_layer(kind, seed=0, **kw):
    args = dict(SMALL, ratio=KINDS[kind])
    args.update(kw)
    layer = V4Attention(kind, **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm_weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name == "attn_sink":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return layer.eval()


def inputs(T, seed=1):
    return torch.randn(T, DIM, generator=torch.Generator().manual_seed(seed))


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def close(actual, expected, frac=3e-3):
    """Within `frac` of expected's largest magnitude: a few bf16 roundings of q/kv/o (the GEMMs
    of a [T] prefill and a [B] decode batch may round a row differently), far below what one
    wrongly selected or dropped row changes (see test_a_wrong_selection_is_caught)."""
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= frac * scale, f"max error {err:.3g} > {frac} * {scale:.3g}"


def decode_all(layer, x, lens, order=None, cache=None, seq_ids=None, start=None, block_size=8):
    """Decode the tokens of sequences `lens` (flattened in x as a ragged batch) one step at a time,
    all live sequences together (in `order`), from `start` (default 0) on; returns the per-token
    outputs in x's order (rows before `start` are NaN) and the cache."""
    cu = cu_of(lens).tolist()
    if cache is None:
        cache = V4LayerCache(layer, num_blocks=64, block_size=block_size, max_seqs=4)
        seq_ids = [cache.add_sequence() for _ in lens]
    start = start or [0] * len(lens)
    order = order or list(range(len(lens)))
    out = torch.full((x.shape[0], DIM), float("nan"))
    topk = {}
    for step in range(max(n - s for n, s in zip(lens, start))):
        live = [b for b in order if start[b] + step < lens[b]]
        rows = [cu[b] + start[b] + step for b in live]
        res = layer.decode_step(x[rows], cache, [seq_ids[b] for b in live])
        out[rows] = res.out.float()
        if res.topk is not None:
            for i, r in enumerate(rows):
                topk[r] = res.topk[i]
    return out, cache, seq_ids, topk


# ---------------------------------------------------------------- prefill == decode

@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prefill_equals_token_by_token_decode(kind, fmt):
    layer = make_layer(kind, kv_cache_dtype=fmt)
    lens = [13, 30]           # window 16: longer than the first, shorter than the second; not multiples of 4 or 8
    x = inputs(sum(lens))
    with torch.no_grad():
        pre = layer(x, cu_of(lens))
        dec, cache, _, topk = decode_all(layer, x, lens, order=[1, 0])   # state rows out of order
    close(dec, pre.out.float())
    if kind == "csa":
        for r, sel in topk.items():   # the same entries chosen (order and -1 padding free)
            assert sorted(v for v in sel.tolist() if v >= 0) == sorted(v for v in pre.topk[r].tolist() if v >= 0), r
    assert cache.seq_len(0) == 13 and cache.seq_len(1) == 30
    assert cache.num_entries(1) == (30 // KINDS[kind] if KINDS[kind] else 0)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_window_not_a_multiple_of_the_ratio(kind):
    """A window of 10 (ratio 4 / 8): window rows and compressed entries overlap unevenly."""
    layer = make_layer(kind, seed=41, window=10)
    lens = [9, 23]
    x = inputs(sum(lens), seed=42)
    with torch.no_grad():
        pre = layer(x, cu_of(lens))
        dec, *_ = decode_all(layer, x, lens)
    close(dec, pre.out.float())
    close(pre.out, ref.v4_attention(layer, x, cu_of(lens), topk=pre.topk).out, 5e-3)
    assert (pre.window >= 0).sum(1).max() == 10


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_prefill_then_decode(kind):
    """A prefill that stores the caches and compressor states, then decode steps: each decoded
    token's output equals the whole-sequence prefill's."""
    layer = make_layer(kind, seed=3)
    lens, first = [14, 29], [9, 21]
    x = inputs(sum(lens), seed=4)
    cu = cu_of(lens).tolist()
    with torch.no_grad():
        pre = layer(x, cu_of(lens))
        cache = V4LayerCache(layer, num_blocks=64, block_size=8, max_seqs=4)
        ids = [cache.add_sequence() for _ in lens]
        head = torch.cat([x[cu[b]:cu[b] + first[b]] for b in range(2)])
        part = layer(head, cu_of(first), cache=cache, seq_ids=ids)
        dec, *_ = decode_all(layer, x, lens, cache=cache, seq_ids=ids, start=first)
    # the stored prefill's own outputs are the full prefill's first tokens
    rows = torch.cat([torch.arange(cu[b], cu[b] + first[b]) for b in range(2)])
    close(part.out, pre.out[rows])
    later = torch.cat([torch.arange(cu[b] + first[b], cu[b + 1]) for b in range(2)])
    close(dec[later], pre.out[later].float())


def test_hca_at_the_model_ratio():
    """HCA with V4's ratio 128: one sequence crossing two entries, a window of 16."""
    layer = make_layer("hca", seed=5, ratio=128, kv_cache_dtype="bf16")
    L = 300
    x = inputs(L, seed=6)
    with torch.no_grad():
        pre = layer(x)
        cache = V4LayerCache(layer, num_blocks=64, block_size=16, max_seqs=1)
        s = cache.add_sequence()
        layer(x[:250], cache=cache, seq_ids=[s])
        outs = [layer.decode_step(x[t:t + 1], cache, [s]) for t in range(250, L)]
    close(torch.cat([o.out for o in outs]), pre.out[250:])
    assert cache.num_entries(s) == 2 and (outs[-1].compressed >= 0).sum() == 2
    r = ref.v4_attention(layer, x)
    close(pre.out, r.out, 5e-3)


def test_streaming_entries_equal_bulk_entries():
    """The compressed cache after token-by-token decode holds the bulk compressor's entries
    (SPEC 10.4: the streaming form emits the entries of the bulk form)."""
    layer = make_layer("csa", seed=7, kv_cache_dtype="bf16")
    lens = [19, 26]
    x = inputs(sum(lens), seed=8)
    with torch.no_grad():
        _, cache, ids, _ = decode_all(layer, x, lens)
        comp = layer.compressor
        kv, score = comp.project(x)
        bulk = dsa_ext.v4_compress(kv, score, comp.ape, comp.norm_weight, layer.eps, layer.rope_cos,
                                   layer.rope_sin, cu_of(lens))
    table = cache.entry_block_table(ids)
    got = []
    for b, n in enumerate(lens):
        pos = torch.arange(n // 4, dtype=torch.int32)[None, :]
        slots = torch.ops.dsa.topk_slot_ids(pos, table[b:b + 1].contiguous(), cache.block_size)
        got.append(torch.ops.dsa.mla_kv_cache_gather(cache.compressed_cache, slots.reshape(-1)).view(-1, 512))
    got = torch.cat(got).float()
    # one bf16 ulp at most (the [B] and [T] GEMMs of wkv / wgate may round differently)
    torch.testing.assert_close(got, bulk.float(), atol=0, rtol=2 ** -7)


# ---------------------------------------------------------------- the dense reference

@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_module_matches_dense_masked_reference(kind, fmt):
    layer = make_layer(kind, seed=11, kv_cache_dtype=fmt)
    lens = [7, 33, 1]
    x = inputs(sum(lens), seed=12)
    with torch.no_grad():
        m = layer(x, cu_of(lens))
    r = ref.v4_attention(layer, x, cu_of(lens), topk=m.topk)
    close(m.o, r.o)
    close(m.out, r.out, 5e-3)
    torch.testing.assert_close(m.lse.double(), r.lse, atol=2e-3, rtol=2e-3)
    if kind == "csa":
        # The FP8 indexer picks the reference's exact top-k (up to near ties).
        own = ref.v4_attention(layer, x, cu_of(lens))
        scores = own.index_scores
        picked = r.selected
        for t in range(scores.shape[0]):
            finite = torch.isfinite(scores[t])
            if not finite.any():
                assert not picked[t].any()
                continue
            k = min(layer.index_topk, int(finite.sum()))
            assert int(picked[t].sum()) == k
            kth = scores[t][finite].sort(descending=True).values[k - 1]
            spread = scores[t][finite].abs().max()
            assert scores[t][picked[t]].min() >= kth - 0.05 * spread, t


def test_a_wrong_selection_is_caught():
    """Negative control for the tolerance: attending one other entry moves the output by far
    more than `close` allows."""
    layer = make_layer("csa", seed=13, shared_indexer=True)
    x = inputs(40, seed=14)
    visible = (torch.arange(40) + 1) // 4
    topk = torch.where(visible[:, None] > 1, torch.stack([visible - 1, visible - 2], 1), -1)
    other = torch.where(visible[:, None] > 2, torch.stack([visible - 1, visible - 3], 1), topk)
    with torch.no_grad():
        a = layer(x, prev_topk=topk.int())
        b = layer(x, prev_topk=other.int())
    with pytest.raises(AssertionError):
        close(b.out, a.out)


# ---------------------------------------------------------------- shared indexer (GLM-5 style)

def test_shared_indexer_reuses_the_previous_topk():
    first = make_layer("csa", seed=21)
    shared = make_layer("csa", seed=22, shared_indexer=True)
    assert shared.indexer_compressor is None and shared.wq_b_index is None
    lens = [18, 27]
    x0, x1 = inputs(sum(lens), seed=23), inputs(sum(lens), seed=24)
    with torch.no_grad():
        a = first(x0, cu_of(lens))
        b = shared(x1, cu_of(lens), prev_topk=a.topk)
    assert torch.equal(b.topk, a.topk)
    close(b.out, ref.v4_attention(shared, x1, cu_of(lens), topk=a.topk).out, 5e-3)
    # decode: the shared layer takes the first layer's per-step selection
    with torch.no_grad():
        c0 = V4LayerCache(first, num_blocks=64, block_size=8)
        c1 = V4LayerCache(shared, num_blocks=64, block_size=8)
        assert c1.index_k_cache is None and c1.index_kv_state is None
        ids0 = [c0.add_sequence() for _ in lens]
        ids1 = [c1.add_sequence() for _ in lens]
        cu = cu_of(lens).tolist()
        out = torch.full_like(b.out, float("nan"))
        for t in range(max(lens)):
            live = [i for i in range(2) if t < lens[i]]
            rows = [cu[i] + t for i in live]
            s0 = first.decode_step(x0[rows], c0, [ids0[i] for i in live])
            s1 = shared.decode_step(x1[rows], c1, [ids1[i] for i in live], prev_topk=s0.topk)
            out[rows] = s1.out
    close(out, b.out)
    with pytest.raises(ValueError, match="prev_topk"):
        shared(x1, cu_of(lens))


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        V4Attention("mla", **SMALL)
    with pytest.raises(ValueError, match="shared_indexer"):
        V4Attention("hca", shared_indexer=True, **SMALL)
    with pytest.raises(ValueError, match="ratio"):
        V4Attention("csa", ratio=1, **SMALL)
    with pytest.raises(ValueError, match="o_groups"):
        V4Attention("swa", **dict(SMALL, o_groups=3))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        V4Attention("swa", kv_cache_dtype="fp4", **SMALL)
    layer = make_layer("csa")
    x = inputs(10)
    with pytest.raises(ValueError, match="x must be 2-D"):
        layer(x[None])
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="prev_topk"):
        layer(x, prev_topk=torch.zeros(10, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rope tables"):
        layer.set_rope(torch.zeros(8, 16), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="past the rope tables"):
        layer(inputs(600))
    shared = make_layer("csa", shared_indexer=True)
    with pytest.raises(ValueError, match="prev_topk must be int32"):
        shared(x, prev_topk=torch.zeros(9, 2, dtype=torch.int32))
    cache = V4LayerCache(layer, num_blocks=8, block_size=8)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="seq_ids must name"):
        layer(x, cache=cache)
    with pytest.raises(ValueError, match="x must be"):
        layer.decode_step(inputs(2), cache, [s])
    with pytest.raises(ValueError, match="distinct"):
        layer.decode_step(inputs(2), cache, [s, s])
    with pytest.raises(KeyError):
        layer.decode_step(inputs(1), cache, [s + 5])
    with pytest.raises(ValueError, match="cache was made"):
        make_layer("hca").decode_step(inputs(1), cache, [s])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        make_layer("csa", kv_cache_dtype="bf16").decode_step(inputs(1), cache, [s])
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        V4LayerCache(layer, num_blocks=8, kv_cache_dtype="e4m3")
    layer.decode_step(inputs(1), cache, [s])
    with pytest.raises(ValueError, match="must be empty"):
        layer(x, cache=cache, seq_ids=[s])
    small = V4LayerCache(layer, num_blocks=2, block_size=8, max_seqs=1)
    small.add_sequence()
    with pytest.raises(RuntimeError, match="state row"):
        small.add_sequence()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cuda_prefill_and_decode_match_cpu(kind):
    """The same layer on CUDA: prefill and token-by-token decode agree with the CPU prefill."""
    layer = make_layer(kind, seed=51)
    lens = [13, 30]
    x = inputs(sum(lens), seed=52)
    with torch.no_grad():
        cpu = layer(x, cu_of(lens))
        layer.cuda()
        gpu = layer(x.cuda(), cu_of(lens).cuda())
        cache = V4LayerCache(layer, num_blocks=64, block_size=8, max_seqs=4, device="cuda")
        ids = [cache.add_sequence() for _ in lens]
        cu = cu_of(lens).tolist()
        dec = torch.full_like(cpu.out, float("nan"))
        for t in range(max(lens)):
            live = [b for b in range(2) if t < lens[b]]
            rows = [cu[b] + t for b in live]
            dec[rows] = layer.decode_step(x[rows].cuda(), cache, [ids[b] for b in live]).out.cpu()
    close(gpu.out.cpu(), cpu.out, 5e-3)
    close(dec, cpu.out, 5e-3)
