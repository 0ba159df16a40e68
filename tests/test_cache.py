"""cache family: fp8_quantize, indexer_k_cache_write/gather, mla_kv_cache_write/gather.

Every op is compared byte for byte with dsa_ext.reference.cache (caches start as random bytes,
so bytes a writer must not touch are checked too), then round trips, quantisation edge cases,
untrusted slots / block ids, opcheck and bad inputs.
"""
import pytest
import torch

import dsa_ext
from dsa_ext.reference import cache as ref

from conftest import randn

FP8 = torch.float8_e4m3fn


def bytes_of(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def same_values(a, b):
    """Equal values, NaN matching NaN (a NaN's sign / payload is not part of the contract)."""
    a, b = a.detach().cpu().float(), b.detach().cpu().float()
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def random_bytes(*shape, gen, device):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)


def random_mla_cache(nb, bs, fp8, gen, device):
    if fp8:
        return random_bytes(nb, bs, 1, 656, gen=gen, device=device)
    return randn(nb, bs, 1, 576, gen=gen, dtype=torch.bfloat16, device=device)


def distinct_slots(n, num_slots, gen, n_skip=0):
    """n distinct slots in [0, num_slots), the first n_skip replaced by negatives (-1, -7)."""
    s = torch.randperm(num_slots, generator=gen)[:n].long()
    s[:n_skip] = torch.tensor([-1, -7] * n_skip)[:n_skip]
    return s


def fp8_error_bound(x, s):
    """|dequant - x| <= half an e4m3 ulp: |x| * 2^-4 for normals, s * 2^-10 for subnormals."""
    return x.abs() * 2.0 ** -4 + s * 2.0 ** -10 + 1e-30


# ---------------------------------------------------------------------------------------------
# fp8_quantize
# ---------------------------------------------------------------------------------------------
# Block sizes cover every CUDA configuration: 1..32 lanes per group, 2/4/8 chunks per lane
# (512, 1024, 2048) and the scalar fallback (3, 4096).
@pytest.mark.parametrize("shape,block_size", [((7, 256), 128), ((2, 3, 512), 128), ((5, 96), 32),
                                              ((4, 128), 64), ((3, 40), 8), ((1, 6), 3), ((0, 128), 128),
                                              ((3, 1024), 512), ((2, 2048), 1024), ((2, 2048), 2048),
                                              ((2, 4096), 4096), ((3, 16), 16)])
@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_matches_reference(device, gen, shape, block_size, ue8m0, dtype):
    # Groups of very different magnitudes, so scales span many powers of two.
    x = randn(*shape, gen=gen, dtype=torch.float32)
    mag = torch.exp2(torch.randint(-20, 12, shape[:-1] + (shape[-1] // block_size, 1),
                                   generator=gen).float())
    x = (x.reshape(*shape[:-1], shape[-1] // block_size, block_size) * mag).reshape(shape).to(dtype)
    q, s = dsa_ext.fp8_quantize(x.to(device), block_size, ue8m0)
    q_ref, s_ref = ref.fp8_quantize(x, block_size, ue8m0)
    assert q.dtype == FP8 and s.dtype == torch.float32 and q.shape == x.shape
    assert s.shape == shape[:-1] + (shape[-1] // block_size,)
    assert torch.equal(bytes_of(q), bytes_of(q_ref))
    assert torch.equal(bytes_of(s), bytes_of(s_ref))
    # Round trip within half an e4m3 ulp; ue8m0 scales are powers of two.
    deq = ref.fp8_dequantize(q.cpu(), s.cpu())
    sg = s.cpu().repeat_interleave(block_size, dim=-1)
    assert ((deq - x.float()).abs() <= fp8_error_bound(x.float(), sg)).all()
    if ue8m0 and s.numel():
        assert torch.equal(torch.exp2(torch.log2(s.cpu()).round()), s.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_misaligned_input(device, gen, dtype):
    """A contiguous view starting one element into its storage (not 16-byte aligned)."""
    buf = randn(1 + 4 * 256, gen=gen, dtype=dtype, device=device)
    x = buf[1:].view(4, 256)
    q, s = dsa_ext.fp8_quantize(x, 128)
    q_ref, s_ref = ref.fp8_quantize(x.cpu(), 128)
    assert torch.equal(bytes_of(q), bytes_of(q_ref)) and torch.equal(bytes_of(s), bytes_of(s_ref))


def test_fp8_quantize_default_args(device, gen):
    x = randn(3, 256, gen=gen, dtype=torch.bfloat16)
    q, s = torch.ops.dsa.fp8_quantize(x.to(device))
    q_ref, s_ref = ref.fp8_quantize(x, 128, True)
    assert torch.equal(bytes_of(q), bytes_of(q_ref)) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("ue8m0", [True, False])
def test_fp8_quantize_edge_groups(device, ue8m0):
    g = 16
    rows = [
        torch.zeros(g),                                        # all zero -> 1e-4 / 448 floor
        torch.full((g,), 1e-7),                                # below the floor
        torch.linspace(-448, 448, g),                          # exactly +-448
        torch.tensor([448.0, -448.0, 1000.0, -1e6] + [3.0] * (g - 4)),   # beyond 448
        torch.tensor([float("nan"), 1.0, -2.0] + [0.5] * (g - 3)),        # NaN ignored by amax
        torch.tensor([7.0] + [-7.0] * (g - 1)),                # amax / 448 an exact power of two
        torch.tensor([1e-30, -3e-38] + [2e-39] * (g - 2)),     # denormal-ish inputs
        torch.tensor([3e38, -1.0, 1e-30, -1e-40] + [5e37] * (g - 4)),   # scale near 2^121
    ]
    x = torch.stack(rows)
    q, s = dsa_ext.fp8_quantize(x.to(device), g, ue8m0)
    q_ref, s_ref = ref.fp8_quantize(x, g, ue8m0)
    assert torch.equal(bytes_of(q), bytes_of(q_ref))
    assert torch.equal(bytes_of(s), bytes_of(s_ref))
    s = s.cpu()[:, 0]
    floor = torch.tensor(1e-4, dtype=torch.float32) / 448
    want0 = torch.exp2(torch.ceil(torch.log2(floor))) if ue8m0 else floor
    assert s[0] == want0 and s[1] == want0
    assert (bytes_of(q)[0] == 0).all()
    # The largest magnitude of a group maps to +-448 (0x7E / 0xFE) when the scale is exact.
    if not ue8m0:
        assert bytes_of(q)[2, 0] == 0xFE and bytes_of(q)[2, -1] == 0x7E
    assert bytes_of(q)[4, 0] == 0x7F                           # NaN stays NaN
    assert s[4] == ref.indexer_scale(torch.tensor(2.0), ue8m0)
    assert s[5] == torch.tensor(7.0) / 448


def test_fp8_quantize_inf_gives_inf_scale(device):
    x = torch.tensor([[float("inf"), 1.0, 2.0, 3.0], [1.0, -float("inf"), 2.0, 3.0]])
    q, s = dsa_ext.fp8_quantize(x.to(device), 4)
    q_ref, s_ref = ref.fp8_quantize(x, 4)
    assert torch.equal(bytes_of(q), bytes_of(q_ref)) and torch.equal(bytes_of(s), bytes_of(s_ref))
    assert torch.isinf(s).all()


# ---------------------------------------------------------------------------------------------
# Indexer K cache
# ---------------------------------------------------------------------------------------------
# (5, 128) and (7, 20) take the CUDA scalar path (odd block size / head_dim % 8 != 0).
@pytest.mark.parametrize("nb,bs,D", [(6, 64, 128), (3, 128, 128), (5, 16, 64), (4, 7, 20), (2, 1, 32),
                                     (3, 5, 128), (2, 4, 512)])
@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_indexer_k_cache_write_matches_reference(device, gen, nb, bs, D, ue8m0, dtype, slot_dtype):
    n = min(nb * bs, 37)
    k = randn(n, D, gen=gen, dtype=dtype, scale=3.0)
    slots = distinct_slots(n, nb * bs, gen, n_skip=2).to(slot_dtype)
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen, device=device)
    cache_ref = cache.cpu().clone()
    dsa_ext.indexer_k_cache_write(k.to(device), slots.to(device), cache, ue8m0)
    ref.indexer_k_cache_write(k, slots, cache_ref, ue8m0)
    assert torch.equal(cache.cpu(), cache_ref)       # includes the bytes of skipped / other slots
    # Round trip through the layout helper.
    k_fp8, k_scale = ref.indexer_cache_tokens(cache.cpu())
    keep = slots >= 0
    rows = slots[keep].long()
    deq = k_fp8[rows].float() * k_scale[rows, None]
    kk = k[keep].float()
    assert ((deq - kk).abs() <= fp8_error_bound(kk, k_scale[rows, None])).all()
    q_ref, s_ref = ref.fp8_quantize(k[keep], D, ue8m0)
    assert torch.equal(bytes_of(k_fp8[rows]), bytes_of(q_ref)) and torch.equal(k_scale[rows], s_ref[:, 0])


def test_indexer_k_cache_write_layout_offsets(device, gen):
    """Hand-computed byte offsets of SPEC section 2 (independent of the reference's code)."""
    nb, bs, D = 3, 4, 8
    cache = torch.zeros(nb, bs, 1, D + 4, dtype=torch.uint8, device=device)
    k = randn(1, D, gen=gen, dtype=torch.bfloat16)
    slot = 2 * bs + 3                                # blk 2, off 3
    dsa_ext.indexer_k_cache_write(k.to(device), torch.tensor([slot], device=device), cache)
    flat = cache.cpu().reshape(-1)
    q, s = ref.fp8_quantize(k, D)
    v0 = 2 * bs * (D + 4) + 3 * D
    s0 = 2 * bs * (D + 4) + bs * D + 4 * 3
    assert torch.equal(flat[v0:v0 + D], bytes_of(q)[0])
    assert torch.equal(flat[s0:s0 + 4], bytes_of(s.reshape(-1)))
    assert int(flat.count_nonzero()) == int(bytes_of(q).count_nonzero()) + int(bytes_of(s).count_nonzero())


def test_indexer_k_cache_write_slot_past_cache(device, gen):
    nb, bs, D = 2, 64, 128
    k = randn(3, D, gen=gen, dtype=torch.bfloat16)
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen, device=device)
    before = cache.cpu().clone()
    slots = torch.tensor([5, nb * bs, 7], device=device)
    if device == "cpu":
        # CPU: checked before anything is written.
        with pytest.raises(ValueError, match="slot_mapping"):
            dsa_ext.indexer_k_cache_write(k, slots, cache)
        assert torch.equal(cache, before)
    else:
        # CUDA: the out-of-range slot is skipped in-kernel (no host sync); the others land.
        dsa_ext.indexer_k_cache_write(k.to(device), slots, cache)
        ref.indexer_k_cache_write(k, torch.tensor([5, -1, 7]), before)
        assert torch.equal(cache.cpu(), before)


@pytest.mark.parametrize("bs,D", [(64, 128), (16, 128), (5, 20)])
def test_indexer_k_cache_gather_matches_reference(device, gen, bs, D):
    nb, B, max_blocks = 9, 4, 4
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen, device="cpu")
    block_table = torch.stack([torch.randperm(nb, generator=gen)[:max_blocks] for _ in range(B)]).int()
    seq_lens = torch.tensor([3 * bs + 1, 0, max_blocks * bs, bs - 1], dtype=torch.int32)
    block_table[0, 3] = -1                              # unused entry (past seq 0's length)
    block_table[3, 1] = 1000                            # unused, out of range
    k_fp8, k_scale = dsa_ext.indexer_k_cache_gather(cache.to(device), block_table.to(device),
                                                    seq_lens.to(device))
    r_fp8, r_scale = ref.indexer_k_cache_gather(cache, block_table, seq_lens)
    assert k_fp8.dtype == FP8 and k_fp8.shape == (int(seq_lens.sum()), D)
    assert torch.equal(bytes_of(k_fp8), bytes_of(r_fp8)) and torch.equal(bytes_of(k_scale), bytes_of(r_scale))
    # Independent check of one token: seq 2, position bs + 2.
    tok_fp8, tok_scale = ref.indexer_cache_tokens(cache)
    row = int(seq_lens[:2].sum()) + bs + 2
    slot = int(block_table[2, 1]) * bs + 2
    assert torch.equal(bytes_of(k_fp8)[row], bytes_of(tok_fp8)[slot])
    assert k_scale[row].item() == tok_scale[slot].item()


def test_indexer_k_cache_gather_bad_block_ids_read_zero(device, gen):
    nb, bs, D = 4, 8, 32
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen, device=device)
    block_table = torch.tensor([[0, -1, 2], [3, 99, 1]], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([3 * bs, 2 * bs], dtype=torch.int32, device=device)
    k_fp8, k_scale = dsa_ext.indexer_k_cache_gather(cache, block_table, seq_lens)
    bad = torch.zeros(5 * bs, dtype=torch.bool)
    bad[bs:2 * bs] = True
    bad[4 * bs:5 * bs] = True
    assert (bytes_of(k_fp8)[bad] == 0).all() and (k_scale.cpu()[bad] == 0).all()
    assert (k_scale.cpu()[~bad] != 0).all()


def test_indexer_k_cache_round_trip(device, gen):
    nb, bs, D, max_blocks = 8, 64, 128, 4
    lens = torch.tensor([100, 1, 64, 0, 200], dtype=torch.int32)   # 2+1+1+0+4 = 8 blocks
    B = lens.numel()
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        for j in range(-(-n // bs)):
            table[b, j] = perm.pop()
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    seq = torch.repeat_interleave(torch.arange(B), lens.long())
    slots = table[seq, pos // bs].long() * bs + pos % bs
    k = randn(slots.numel(), D, gen=gen, dtype=torch.bfloat16, scale=2.0)
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen, device=device)
    dsa_ext.indexer_k_cache_write(k.to(device), slots.to(device), cache)
    k_fp8, k_scale = dsa_ext.indexer_k_cache_gather(cache, table.to(device), lens.to(device))
    q_ref, s_ref = ref.fp8_quantize(k, D)
    assert torch.equal(bytes_of(k_fp8), bytes_of(q_ref)) and torch.equal(k_scale.cpu(), s_ref[:, 0])
    deq = k_fp8.cpu().float() * k_scale.cpu()[:, None]
    assert ((deq - k.float()).abs() <= fp8_error_bound(k.float(), k_scale.cpu()[:, None])).all()


def test_indexer_k_cache_gather_bad_seq_lens(device, gen):
    cache = random_bytes(2, 8, 1, 36, gen=gen, device=device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="seq_lens"):
        dsa_ext.indexer_k_cache_gather(cache, table, torch.tensor([17], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="seq_lens"):
        dsa_ext.indexer_k_cache_gather(cache, table, torch.tensor([-1], dtype=torch.int32, device=device))
    k_fp8, k_scale = dsa_ext.indexer_k_cache_gather(
        cache, table[:0], torch.zeros(0, dtype=torch.int32, device=device))
    assert k_fp8.shape == (0, 32) and k_scale.shape == (0,)


# ---------------------------------------------------------------------------------------------
# MLA KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("nb,bs", [(4, 64), (3, 5), (1, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_kv_cache_write_matches_reference(device, gen, fp8, nb, bs, dtype, slot_dtype):
    n = min(nb * bs, 29)
    kv = randn(n, 576, gen=gen, dtype=torch.float32)
    kv[:, 128:256] *= 1e-3                       # tiles of different magnitudes
    kv[:, 256:384] *= 200.0
    kv[0, 384:512] = 0.0                         # all-zero tile -> 1e-4 floor
    kv = kv.to(dtype)
    slots = distinct_slots(n, nb * bs, gen, n_skip=2).to(slot_dtype)
    cache = random_mla_cache(nb, bs, fp8, gen, device)
    cache_ref = cache.cpu().clone()
    dsa_ext.mla_kv_cache_write(kv.to(device), slots.to(device), cache)
    ref.mla_kv_cache_write(kv, slots, cache_ref)
    assert torch.equal(bytes_of(cache), bytes_of(cache_ref))


def test_mla_kv_cache_write_misaligned_kv(device, gen):
    buf = randn(1 + 3 * 576, gen=gen, dtype=torch.bfloat16, device=device)
    kv = buf[1:].view(3, 576)
    slots = torch.tensor([4, -1, 0], device=device)
    cache = random_mla_cache(1, 8, True, gen, device)
    cache_ref = cache.cpu().clone()
    dsa_ext.mla_kv_cache_write(kv, slots, cache)
    ref.mla_kv_cache_write(kv.cpu(), slots.cpu(), cache_ref)
    assert torch.equal(cache.cpu(), cache_ref)


def test_mla_fp8_record_layout(device, gen):
    """Hand-checked record: FP8 nope tiles, 4 fp32 pow2 scales at 512, bf16 rope at 528."""
    kv = randn(1, 576, gen=gen, dtype=torch.bfloat16)
    kv[0, 0] = 448.0 * 2.0                                  # tile 0 amax/448 = 2 exactly
    kv[0, 128:256] = 0.0                                    # tile 1: 1e-4 floor -> 2^-13
    cache = torch.zeros(2, 4, 1, 656, dtype=torch.uint8, device=device)
    dsa_ext.mla_kv_cache_write(kv.to(device), torch.tensor([5], device=device), cache)
    rec = cache.cpu().reshape(8, 656)[5]
    assert (cache.cpu().reshape(8, 656)[[0, 1, 2, 3, 4, 6, 7]] == 0).all()
    scales = rec[512:528].view(torch.float32)
    assert scales[0] == 2.0 and scales[1] == 2.0 ** -13
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert rec[0] == 0x7E                                   # 896 / 2 = 448
    assert (rec[128:256] == 0).all()
    assert torch.equal(rec[528:].view(torch.bfloat16), kv[0, 512:])


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_kv_cache_gather_matches_reference(device, gen, fp8, slot_dtype):
    nb, bs = 3, 64
    cache = random_mla_cache(nb, bs, fp8, gen, "cpu")
    if fp8:   # random scale bytes would be NaN/inf/huge: give every record sane scales
        rec = cache.view(nb * bs, 656)
        rec[:, 512:528] = (torch.exp2(torch.randint(-12, 4, (nb * bs, 4), generator=gen).float())
                           .contiguous().view(torch.uint8))
    slots = torch.randint(0, nb * bs, (50,), generator=gen)
    slots[[3, 10, 11]] = torch.tensor([-1, nb * bs, 2 ** 40])
    slots = slots.to(slot_dtype) if slot_dtype == torch.int64 else slots.clamp(max=2**31 - 1).to(slot_dtype)
    out = dsa_ext.mla_kv_cache_gather(cache.to(device), slots.to(device))
    out_ref = ref.mla_kv_cache_gather(cache, slots)
    assert out.dtype == torch.bfloat16 and out.shape == (50, 1, 576)
    # Random nope bytes include e4m3 NaNs; those rows compare as NaN, the rest bit for bit.
    assert same_values(out, out_ref)
    finite = ~torch.isnan(out_ref.float())
    assert torch.equal(bytes_of(out).view(torch.int16)[finite], bytes_of(out_ref).view(torch.int16)[finite])
    assert (out.cpu()[[3, 10, 11]] == 0).all()


@pytest.mark.parametrize("fp8", [True, False])
def test_mla_kv_cache_round_trip(device, gen, fp8):
    nb, bs, n = 4, 64, 100
    kv = randn(n, 576, gen=gen, dtype=torch.bfloat16, scale=4.0)
    slots = distinct_slots(n, nb * bs, gen)
    cache = random_mla_cache(nb, bs, fp8, gen, device)
    dsa_ext.mla_kv_cache_write(kv.to(device), slots.to(device), cache)
    out = dsa_ext.mla_kv_cache_gather(cache, slots.to(device)).cpu()[:, 0].float()
    if not fp8:
        assert torch.equal(out, kv.float())
        return
    assert torch.equal(out[:, 512:], kv[:, 512:].float())       # rope is not quantised
    amax = kv[:, :512].float().abs().reshape(n, 4, 128).amax(-1)
    tile_s = ref.mla_tile_scale(amax).repeat_interleave(128, dim=-1)
    x = kv[:, :512].float()
    # bf16 output rounding adds up to 2^-9 relative on top of the FP8 error.
    bound = fp8_error_bound(x, tile_s) * 1.01 + out[:, :512].abs() * 2.0 ** -8
    assert ((out[:, :512] - x).abs() <= bound).all()
    assert torch.allclose(ref.dequantize_mla_cache(cache.cpu())[slots], out, rtol=2**-8, atol=0)


@pytest.mark.parametrize("which", ["indexer", "mla_fp8", "mla_bf16"])
def test_cache_write_repeated_slot(device, gen, which):
    """A slot written twice in one call: the CPU refuses before writing anything (the tokens
    are written in parallel, so the record could mix two tokens); repeated negative slots are
    fine. CUDA does not check (no host sync): the other slots land, the repeated one is
    unspecified."""
    if which == "indexer":
        x = randn(4, 128, gen=gen, dtype=torch.bfloat16)
        cache = random_bytes(2, 8, 1, 132, gen=gen, device=device)
        write, ref_write = dsa_ext.indexer_k_cache_write, ref.indexer_k_cache_write
    else:
        x = randn(4, 576, gen=gen, dtype=torch.bfloat16)
        cache = random_mla_cache(2, 8, which == "mla_fp8", gen, device)
        write, ref_write = dsa_ext.mla_kv_cache_write, ref.mla_kv_cache_write
    before = cache.cpu().clone()
    slots = torch.tensor([3, 9, 3, -1], device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="slot 3 more than once"):
            write(x, slots, cache)
        assert torch.equal(cache, before)
        write(x, torch.tensor([3, -1, 9, -1]), cache)              # -1 may repeat
        ref_write(x, torch.tensor([3, -1, 9, -1]), before)
        assert torch.equal(cache, before)
    else:
        write(x.to(device), slots, cache)
        ref_write(x, torch.tensor([-1, 9, -1, -1]), before)
        keep = torch.arange(16) != 3
        if which == "indexer":                                     # values and scales apart
            (gk, gs), (wk, ws) = ref.indexer_cache_tokens(cache.cpu()), ref.indexer_cache_tokens(before)
            assert torch.equal(gk.view(torch.uint8)[keep], wk.view(torch.uint8)[keep])
            assert torch.equal(gs[keep], ws[keep])
        else:
            assert torch.equal(cache.cpu().view(16, -1)[keep], before.view(16, -1)[keep])


def test_mla_kv_cache_write_slot_past_cache(device, gen):
    kv = randn(2, 576, gen=gen, dtype=torch.bfloat16)
    cache = random_mla_cache(2, 4, True, gen, device)
    before = cache.cpu().clone()
    slots = torch.tensor([8, 1], device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="slot_mapping"):
            dsa_ext.mla_kv_cache_write(kv, slots, cache)
        assert torch.equal(cache, before)
    else:
        dsa_ext.mla_kv_cache_write(kv.to(device), slots, cache)
        ref.mla_kv_cache_write(kv, torch.tensor([-1, 1]), before)
        assert torch.equal(cache.cpu(), before)


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile and bad inputs
# ---------------------------------------------------------------------------------------------
def _opcheck_cases(device, gen):
    x = randn(4, 256, gen=gen, dtype=torch.bfloat16, device=device)
    k = randn(5, 128, gen=gen, dtype=torch.bfloat16, device=device)
    kv = randn(5, 576, gen=gen, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([3, -1, 70, 0, 127], device=device)
    # Caches filled by the reference writer: random bytes would hold NaNs, which opcheck's
    # output comparisons treat as mismatches.
    icache = ref.new_indexer_k_cache(2, 64, 128)
    ref.indexer_k_cache_write(randn(128, 128, gen=gen), torch.arange(128), icache)
    icache = icache.to(device)
    mcache = ref.new_mla_kv_cache(2, 64)
    ref.mla_kv_cache_write(randn(128, 576, gen=gen), torch.arange(128), mcache)
    mcache = mcache.to(device)
    bcache = random_mla_cache(2, 64, False, gen, device)
    table = torch.tensor([[1, 0], [0, 1]], dtype=torch.int32, device=device)
    lens = torch.tensor([70, 5], dtype=torch.int32, device=device)
    return [
        (torch.ops.dsa.fp8_quantize.default, (x, 128, True)),
        (torch.ops.dsa.fp8_quantize.default, (x.float(), 64, False)),
        (torch.ops.dsa.indexer_k_cache_write.default, (k, slots, icache, True)),
        (torch.ops.dsa.indexer_k_cache_gather.default, (icache, table, lens)),
        (torch.ops.dsa.mla_kv_cache_write.default, (kv, slots, mcache)),
        (torch.ops.dsa.mla_kv_cache_write.default, (kv, slots, bcache)),
        (torch.ops.dsa.mla_kv_cache_gather.default, (mcache, slots)),
        (torch.ops.dsa.mla_kv_cache_gather.default, (bcache, slots.int())),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(device, gen, case):
    op, args = _opcheck_cases(device, gen)[case]
    torch.library.opcheck(op, args)


def test_fake_shapes_and_compile(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()):
        cache = torch.empty(4, 64, 1, 132, dtype=torch.uint8)
        k_fp8, k_scale = torch.ops.dsa.indexer_k_cache_gather(
            cache, torch.empty(2, 3, dtype=torch.int32), torch.empty(2, dtype=torch.int32))
        assert k_fp8.shape[1] == 128 and k_fp8.dtype == FP8 and k_scale.shape[0] == k_fp8.shape[0]
        q, s = torch.ops.dsa.fp8_quantize(torch.empty(3, 5, 512), 128, True)
        assert q.shape == (3, 5, 512) and s.shape == (3, 5, 4)
        out = torch.ops.dsa.mla_kv_cache_gather(torch.empty(2, 64, 1, 656, dtype=torch.uint8),
                                                torch.empty(7, dtype=torch.int64))
        assert out.shape == (7, 1, 576) and out.dtype == torch.bfloat16

    @torch.compile(fullgraph=True, backend="eager")
    def write_then_read(kv, slots, cache):
        dsa_ext.mla_kv_cache_write(kv, slots, cache)
        return dsa_ext.mla_kv_cache_gather(cache, slots)

    @torch.compile(fullgraph=True, backend="eager")
    def quantize_write_gather(x, k, slots, icache, table, lens):
        q, s = dsa_ext.fp8_quantize(x)
        dsa_ext.indexer_k_cache_write(k, slots, icache)
        k_fp8, k_scale = dsa_ext.indexer_k_cache_gather(icache, table, lens)
        return q, s, k_fp8, k_scale

    x = randn(3, 256, gen=gen, dtype=torch.bfloat16)
    k = randn(5, 128, gen=gen, dtype=torch.bfloat16)
    icache = ref.new_indexer_k_cache(2, 4)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    lens = torch.tensor([6], dtype=torch.int32)
    q, s, k_fp8, k_scale = quantize_write_gather(x, k, torch.tensor([4, 5, 6, 7, 0]), icache, table, lens)
    q_ref, s_ref = ref.fp8_quantize(x)
    kq_ref, ks_ref = ref.fp8_quantize(k, 128)
    assert torch.equal(bytes_of(q), bytes_of(q_ref)) and torch.equal(s, s_ref)
    # Positions 0-3 are block 1 (slots 4-7 = k[0:4]), 4-5 block 0 (slot 0 = k[4], slot 1 unwritten).
    assert k_fp8.shape == (6, 128)
    assert torch.equal(bytes_of(k_fp8)[:5], bytes_of(kq_ref)) and torch.equal(k_scale[:5], ks_ref[:, 0])
    assert k_scale[5] == 0 and (bytes_of(k_fp8)[5] == 0).all()

    kv = randn(6, 576, gen=gen, dtype=torch.bfloat16)
    cache = ref.new_mla_kv_cache(2, 8)
    slots = torch.tensor([0, 3, 9, 15, 2, 8])
    out = write_then_read(kv, slots, cache)
    ref_cache = ref.new_mla_kv_cache(2, 8)
    ref.mla_kv_cache_write(kv, slots, ref_cache)
    assert torch.equal(cache, ref_cache) and torch.equal(out, ref.mla_kv_cache_gather(ref_cache, slots))


BAD_INPUTS = [
    # (op name, args builder, exception, match)
    ("fp8_quantize", lambda d: (torch.randn(4, 256, device=d).half(), 128, True), RuntimeError, "x must be"),
    ("fp8_quantize", lambda d: (torch.randn(4, 100, device=d), 128, True), ValueError, "block_size"),
    ("fp8_quantize", lambda d: (torch.randn(4, 128, device=d), 0, True), ValueError, "block_size"),
    ("fp8_quantize", lambda d: (torch.tensor(1.0, device=d), 1, True), RuntimeError, "x must have"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 128, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                         torch.zeros(2, 64, 1, 132, device=d), True), RuntimeError, "kv_cache must be uint8"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 64, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                         torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), True), RuntimeError, r"k.size\(1\)"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 128, device=d), torch.zeros(3, device=d),
                                         torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), True), RuntimeError, "slot_mapping must be int64 or int32"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 128, device=d), torch.zeros(4, dtype=torch.long, device=d),
                                         torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), True), RuntimeError, r"slot_mapping.size\(0\)"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 128, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                         torch.zeros(2, 132, 64, 1, dtype=torch.uint8, device=d).permute(0, 2, 3, 1), True), RuntimeError, "kv_cache"),
    ("indexer_k_cache_write", lambda d: (torch.randn(3, 128, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                         torch.zeros(2, 64, 132, dtype=torch.uint8, device=d), True), RuntimeError, "kv_cache must be 4-D"),
    ("indexer_k_cache_gather", lambda d: (torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), torch.zeros(2, 3, dtype=torch.long, device=d),
                                          torch.zeros(2, dtype=torch.int32, device=d)), RuntimeError, "block_table must be int32"),
    ("indexer_k_cache_gather", lambda d: (torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), torch.zeros(2, 3, dtype=torch.int32, device=d),
                                          torch.zeros(3, dtype=torch.int32, device=d)), RuntimeError, r"seq_lens.size\(0\)"),
    ("indexer_k_cache_gather", lambda d: (torch.zeros(2, 64, 1, 132, dtype=torch.uint8, device=d), torch.zeros(2, 3, dtype=torch.int32, device=d),
                                          torch.zeros(2, dtype=torch.int64, device=d)), RuntimeError, "seq_lens must be int32"),
    ("mla_kv_cache_write", lambda d: (torch.randn(3, 512, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                      torch.zeros(2, 64, 1, 656, dtype=torch.uint8, device=d)), RuntimeError, r"kv.size\(1\)"),
    ("mla_kv_cache_write", lambda d: (torch.randn(3, 576, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                      torch.zeros(2, 64, 1, 576, dtype=torch.uint8, device=d)), RuntimeError, r"kv_cache.size\(3\) must be 656"),
    ("mla_kv_cache_write", lambda d: (torch.randn(3, 576, device=d), torch.zeros(3, dtype=torch.long, device=d),
                                      torch.zeros(2, 64, 1, 576, device=d)), RuntimeError, "kv_cache must be uint8 or bfloat16"),
    ("mla_kv_cache_write", lambda d: (torch.randn(3, 576, device=d).half(), torch.zeros(3, dtype=torch.long, device=d),
                                      torch.zeros(2, 64, 1, 656, dtype=torch.uint8, device=d)), RuntimeError, "kv must be"),
    ("mla_kv_cache_gather", lambda d: (torch.zeros(2, 64, 1, 656, dtype=torch.uint8, device=d), torch.zeros(3, 1, dtype=torch.long, device=d)),
     RuntimeError, "slots must be 1-D"),
    ("mla_kv_cache_gather", lambda d: (torch.zeros(2, 64, 1, 656, dtype=torch.uint8, device=d), torch.zeros(3, device=d)),
     RuntimeError, "slots must be int64 or int32"),
    ("mla_kv_cache_gather", lambda d: (torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16, device=d)[:, ::2], torch.zeros(3, dtype=torch.long, device=d)),
     RuntimeError, "kv_cache must be contiguous"),
]


@pytest.mark.parametrize("i", range(len(BAD_INPUTS)))
def test_bad_inputs(device, i):
    name, build, exc, match = BAD_INPUTS[i]
    with pytest.raises(exc, match=match):
        getattr(torch.ops.dsa, name)(*build(device))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_writers_and_mla_gather_are_cuda_graph_safe(gen):
    """The writers and mla_kv_cache_gather never synchronise: they capture into a CUDA graph,
    out-of-range slots included, and replays give the eager results."""
    kv = randn(16, 576, gen=gen, dtype=torch.bfloat16, device="cuda")
    k = randn(16, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
    slots = torch.randperm(128, generator=gen)[:16].cuda()
    slots[3] = 10 ** 6                                   # skipped in-kernel on CUDA
    slots[5] = -1
    mcache = ref.new_mla_kv_cache(2, 64, device="cuda")
    icache = ref.new_indexer_k_cache(2, 64, 128, device="cuda")
    x = randn(4, 512, gen=gen, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dsa_ext.mla_kv_cache_write(kv, slots, mcache)
        dsa_ext.indexer_k_cache_write(k, slots, icache)
        rows = dsa_ext.mla_kv_cache_gather(mcache, slots)
        q, s = dsa_ext.fp8_quantize(x)
    graph.replay()
    torch.cuda.synchronize()
    keep = slots.cpu().clone()
    keep[3] = -1
    m_ref, i_ref = ref.new_mla_kv_cache(2, 64), ref.new_indexer_k_cache(2, 64, 128)
    ref.mla_kv_cache_write(kv.cpu(), keep, m_ref)
    ref.indexer_k_cache_write(k.cpu(), keep, i_ref)
    assert torch.equal(mcache.cpu(), m_ref) and torch.equal(icache.cpu(), i_ref)
    assert torch.equal(bytes_of(rows), bytes_of(ref.mla_kv_cache_gather(m_ref, slots.cpu())))
    q_ref, s_ref = ref.fp8_quantize(x.cpu())
    assert torch.equal(bytes_of(q), bytes_of(q_ref)) and torch.equal(s.cpu(), s_ref)


def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(RuntimeError, match="slot_mapping must be on the same device"):
        torch.ops.dsa.mla_kv_cache_write(torch.randn(3, 576, device="cuda"), torch.zeros(3, dtype=torch.long),
                                          torch.zeros(2, 64, 1, 656, dtype=torch.uint8, device="cuda"))


# ---- DeepSeek-V4 MLA cache (FlashMLA MODEL1, SPEC 10.2) ----------------------------------------

def flashmla_model1_pages(kv):
    """FlashMLA's MODEL1 quantiser as its tests/quant.py defines it, written out here: kv
    [nb, bs, 512] -> the pages [nb, pitch] (pitch = bs*584 rounded up to a multiple of 576) and
    a mask of the bytes it defines (its pad bytes are left uninitialised)."""
    nb, bs, _ = kv.shape
    pitch = -(-bs * 584 // 576) * 576
    pages = torch.zeros(nb, pitch, dtype=torch.uint8)
    defined = torch.zeros(nb, pitch, dtype=torch.bool)
    rows = pages[:, :bs * 576].view(nb, bs, 576)
    scales = pages[:, bs * 576:bs * 584].view(nb, bs, 8)
    for t in range(7):
        x = kv[..., 64 * t:64 * (t + 1)].float()
        s = torch.pow(2, torch.clamp_min(x.abs().amax(-1) / 448.0, 1e-4).log2().ceil())
        rows[..., 64 * t:64 * (t + 1)] = (x / s[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)
        scales[..., t] = s.to(torch.float8_e8m0fnu).view(torch.uint8)
    rows[..., 448:] = kv[..., 448:].to(torch.bfloat16).contiguous().view(torch.uint8).view(nb, bs, 128)
    defined[:, :bs * 576] = True
    defined[:, bs * 576:bs * 584].view(nb, bs, 8)[..., :7] = True
    return pages, defined


@pytest.mark.parametrize("bs", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v4_cache_bytes_match_flashmla_model1(device, gen, bs, dtype):
    nb = 3
    kv = randn(nb * bs, 512, gen=gen, dtype=dtype, scale=4.0)
    kv[0, 3] = 1e-6                                   # a tile whose scale is the 1e-4 floor
    kv[:, 64:128] *= 1e-3
    cache = ref.new_mla_kv_cache(nb, bs, True, device=device, model="v4")
    assert cache.stride(0) == -(-bs * 584 // 576) * 576            # FlashMLA's padded pitch
    perm = torch.randperm(nb * bs, generator=gen)        # tokens written in a shuffled order
    dsa_ext.mla_kv_cache_write(kv[perm].to(device), perm.to(device), cache)
    want, defined = flashmla_model1_pages(kv.view(nb, bs, 512))
    got = cache.cpu().contiguous().view(nb, bs * 584)    # the bytes of each page, pitch dropped
    want = want[:, :bs * 584]
    defined = defined[:, :bs * 584]
    assert torch.equal(got[defined], want[defined])
    assert (got[~defined] == 0).all()                 # our pad byte is written 0
    # dequantised the FlashMLA way (bf16 fp8 * bf16 scale) equals our gather
    deq = ref.dequantize_mla_cache(cache.cpu())
    g = dsa_ext.mla_kv_cache_gather(cache, torch.arange(nb * bs, device=device))
    assert g.shape == (nb * bs, 1, 512)
    assert torch.equal(g.cpu()[:, 0].view(torch.int16), deq.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("fp8", [True, False])
def test_v4_cache_write_gather_slots(device, gen, fp8):
    """Ragged slot sets (skips, a subset, int32/int64), invalid gather slots read zeros, a
    contiguous V4 page layout works as well as FlashMLA's padded one, a float8 view works."""
    nb, bs = 4, 16
    kv = randn(30, 512, gen=gen, dtype=torch.bfloat16)
    slots = torch.randperm(nb * bs, generator=gen)[:30]
    slots[::7] = -1
    for layout in ("padded", "contiguous"):
        cache = ref.new_mla_kv_cache(nb, bs, fp8, device=device, model="v4")
        if layout == "contiguous":
            cache = cache.contiguous()
        want = ref.new_mla_kv_cache(nb, bs, fp8, model="v4")
        target = cache.view(torch.float8_e4m3fn) if fp8 else cache
        dsa_ext.mla_kv_cache_write(kv.to(device), slots.int().to(device), target)
        ref.mla_kv_cache_write(kv, slots, want)
        assert torch.equal(ref.dequantize_mla_cache(cache.cpu()).view(torch.int32),
                           ref.dequantize_mla_cache(want).view(torch.int32))
        q = torch.tensor([5, -1, nb * bs, 2 ** 31 - 1, 0, 63])
        got = dsa_ext.mla_kv_cache_gather(target, q.to(device))
        assert torch.equal(got.cpu().view(torch.int16), ref.mla_kv_cache_gather(want, q).view(torch.int16))
        assert (got.cpu()[1:4] == 0).all()


def test_v4_cache_bad_inputs(device, gen):
    cache = ref.new_mla_kv_cache(2, 16, True, device=device, model="v4")
    kv = randn(2, 576, gen=gen, dtype=torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match=r"kv.size\(1\) must be 512"):
        dsa_ext.mla_kv_cache_write(kv, torch.tensor([0, 1], device=device), cache)
    tight = torch.zeros(2 * 16 * 584, dtype=torch.uint8, device=device)
    overlapping = torch.as_strided(tight, (2, 16, 1, 584), (16 * 584 - 16, 584, 584, 1))
    with pytest.raises(RuntimeError, match="page pitch"):
        dsa_ext.mla_kv_cache_gather(overlapping, torch.tensor([0], device=device))
    with pytest.raises(RuntimeError, match="must be 656 .* or 584"):
        dsa_ext.mla_kv_cache_gather(torch.zeros(2, 16, 1, 600, dtype=torch.uint8, device=device),
                                    torch.tensor([0], device=device))
    with pytest.raises(RuntimeError, match="576 .* or 512"):
        dsa_ext.mla_kv_cache_gather(torch.zeros(2, 16, 1, 584, dtype=torch.bfloat16, device=device),
                                    torch.tensor([0], device=device))
    with pytest.raises((RuntimeError, ValueError), match="kv_cache"):   # decode reads V3.2 caches only, so far
        dsa_ext.sparse_mla_decode(randn(1, 1, 16, 576, gen=gen, dtype=torch.bfloat16, device=device),
                                  cache, torch.zeros(1, 1, 8, dtype=torch.int32, device=device), 0.1)
