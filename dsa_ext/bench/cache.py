"""Benchmark cases of the cache family: fp8_quantize, the two cache writers and the two
readers (memory-bound; reported in GB/s). The baseline is the pure-PyTorch implementation a user would otherwise run
(dsa_ext.reference.cache: the same bytes, written with ATen ops).

Shapes on CUDA: a 4096-token prefill chunk of a DeepSeek-V3.2 layer (64 indexer heads of 128
for the query quantisation, the 128-dim indexer key and the 576-dim MLA latent per token, block
size 64). `quick` / CPU: 256 tokens.
"""
from __future__ import annotations

import torch

import dsa_ext
from dsa_ext.reference import cache as ref

from .common import Case

__all__ = ["cases"]


def cases(device, quick: bool):
    device = torch.device(device)
    tokens = 256 if (quick or device.type != "cuda") else 4096
    heads, head_dim, block_size = 64, 128, 64
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    out = []

    # fp8_quantize of the indexer queries [T, 64, 128], block 128, ue8m0.
    q = randn(tokens, heads, head_dim)
    n = q.numel()
    out.append(Case(
        family="cache", name="fp8_quantize",
        shape=dict(T=tokens, H=heads, D=head_dim, block_size=128),
        fn=lambda: dsa_ext.fp8_quantize(q, 128, True),
        bytes=2 * n + n + 4 * (n // 128),
        baselines={"torch (reference)": lambda: ref.fp8_quantize(q, 128, True)},
    ))

    # hadamard_fp8_quantize of the same queries: the rotation fused into the quantisation, against
    # what V3.2's reference code runs (rotate in bf16, then quantise).
    from dsa_ext.reference import hadamard as href
    out.append(Case(
        family="cache", name="hadamard_fp8_quantize",
        shape=dict(T=tokens, H=heads, D=head_dim, block_size=128),
        fn=lambda: dsa_ext.hadamard_fp8_quantize(q, 128, True),
        bytes=2 * n + n + 4 * (n // 128),
        baselines={"torch rotate + fp8_quantize": lambda: dsa_ext.fp8_quantize(
            href.hadamard_transform(q).to(torch.bfloat16), 128, True)},
    ))

    # Slots: every token into its own slot of a cache twice the needed size, in shuffled order
    # (as a paged allocator hands out blocks).
    num_blocks = 2 * (-(-tokens // block_size))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(device)

    # indexer_k_cache_write: k [T, 128] -> uint8 [nb, 64, 1, 132].
    k = randn(tokens, head_dim)
    icache = ref.new_indexer_k_cache(num_blocks, block_size, head_dim, device=device)
    out.append(Case(
        family="cache", name="indexer_k_cache_write",
        shape=dict(N=tokens, D=head_dim, block_size=block_size),
        fn=lambda: dsa_ext.indexer_k_cache_write(k, slots, icache, True),
        bytes=tokens * (2 * head_dim + 8 + head_dim + 4),
        baselines={"torch (reference)": lambda: ref.indexer_k_cache_write(k, slots, icache, True)},
    ))

    # mla_kv_cache_write: kv [T, 576] -> FP8 656-byte records, and -> bf16 rows.
    kv = randn(tokens, 576)
    for fp8 in (True, False):
        mcache = ref.new_mla_kv_cache(num_blocks, block_size, fp8=fp8, device=device)
        record = 656 if fp8 else 1152
        out.append(Case(
            family="cache", name="mla_kv_cache_write" + ("" if fp8 else "_bf16"),
            shape=dict(N=tokens, block_size=block_size, fp8=int(fp8)),
            fn=lambda c=mcache: dsa_ext.mla_kv_cache_write(kv, slots, c),
            bytes=tokens * (2 * 576 + 8 + record),
            baselines={"torch (reference)": lambda c=mcache: ref.mla_kv_cache_write(kv, slots, c)},
        ))

    # Readers. mla_kv_cache_gather: the rows a decode step's top-k selects (B=128, K=2048 on
    # CUDA), dequantised to bf16. indexer_k_cache_gather: 4 sequences' keys for indexer_logits
    # (it synchronises once for sum(seq_lens)).
    rows = 128 * 2048 if tokens == 4096 else 1024
    fp8_cache = ref.new_mla_kv_cache(num_blocks, block_size, fp8=True, device=device)
    dsa_ext.mla_kv_cache_write(kv, slots, fp8_cache)
    picks = slots[torch.randint(0, tokens, (rows,), generator=g).to(device)]
    out.append(Case(
        family="cache", name="mla_kv_cache_gather",
        shape=dict(M=rows, block_size=block_size, fp8=1),
        fn=lambda: dsa_ext.mla_kv_cache_gather(fp8_cache, picks),
        bytes=rows * (8 + 656 + 2 * 576),
        baselines={"torch (reference)": lambda: ref.mla_kv_cache_gather(fp8_cache, picks)},
    ))

    dsa_ext.indexer_k_cache_write(k, slots, icache, True)
    batch = 4
    per_seq = tokens // batch
    blocks_per_seq = -(-per_seq // block_size)
    table = torch.randperm(num_blocks, generator=g)[: batch * blocks_per_seq]
    table = table.reshape(batch, blocks_per_seq).int().to(device)
    lens = torch.full((batch,), per_seq, dtype=torch.int32, device=device)
    out.append(Case(
        family="cache", name="indexer_k_cache_gather",
        shape=dict(B=batch, seq_len=per_seq, D=head_dim, block_size=block_size),
        fn=lambda: dsa_ext.indexer_k_cache_gather(icache, table, lens),
        bytes=2 * batch * per_seq * (head_dim + 4) + table.numel() * 4,
        baselines={"torch (reference)": lambda: ref.indexer_k_cache_gather(icache, table, lens)},
        note="synchronises once (output size sum(seq_lens))",
    ))
    return out
