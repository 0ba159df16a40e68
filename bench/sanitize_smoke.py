"""Calls every op once on small random inputs, including invalid indices and slots, so that
compute-sanitizer (memcheck, racecheck) sees each CUDA kernel run. Used by gpu_check.sh
--sanitize; `python bench/sanitize_smoke.py cpu` checks the script itself on a CPU machine."""
import os
import sys

import torch

import dsa_ext

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
g = torch.Generator().manual_seed(0)


def rn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)


def ri(lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(dev)


# caches and quantisation
x8, xs = dsa_ext.fp8_quantize(rn(5, 256))
nb, bs, D = 4, 64, 128
icache = torch.zeros(nb, bs, 1, D + 4, dtype=torch.uint8, device=dev)
slots = torch.tensor([0, 5, -1, 130, 255], dtype=torch.int64, device=dev)
dsa_ext.indexer_k_cache_write(rn(5, D), slots, icache)
bt = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32, device=dev)
dsa_ext.indexer_k_cache_gather(icache, bt, torch.tensor([70, 3], dtype=torch.int32, device=dev))
for cache in (torch.zeros(nb, bs, 1, 656, dtype=torch.uint8, device=dev),
              torch.zeros(nb, bs, 1, 576, dtype=torch.bfloat16, device=dev)):
    dsa_ext.mla_kv_cache_write(rn(5, 576), slots, cache)
    dsa_ext.mla_kv_cache_gather(cache, ri(-1, nb * bs, 7))

# indexer and top-k
T, S, H = 8, 300, 64
q8 = rn(T, H, D).to(torch.float8_e4m3fn)
k8 = rn(S, D).to(torch.float8_e4m3fn)
ks = ri(0, 50, T)
ke = torch.minimum(ks + ri(0, S, T), torch.tensor(S, dtype=torch.int32, device=dev))
logits = dsa_ext.indexer_logits(q8, k8, rn(S, dtype=torch.float32).abs(), rn(T, H, dtype=torch.float32), ks, ke)
dsa_ext.topk_indices(logits, 64, ks, ke)
dsa_ext.topk_indices(logits, 64, sorted=True)
qp = rn(2, 2, H, D).to(torch.float8_e4m3fn)
ctx = torch.tensor([100, 7], dtype=torch.int32, device=dev)
pl = dsa_ext.paged_indexer_logits(qp, icache, rn(4, H, dtype=torch.float32), ctx, bt, 128)
idx = dsa_ext.topk_indices(pl, 64)
dsa_ext.topk_slot_ids(idx, bt, bs)
dsa_ext.indexer_topk(q8, k8, rn(S, dtype=torch.float32).abs(), rn(T, H, dtype=torch.float32), ks, ke, 64)

# sparse attention, prefill fwd/bwd and decode (with -1 and out-of-range indices)
Sk, K, Ha = 200, 128, 16
q = rn(T, Ha, 576, scale=0.3)
kv = rn(Sk, 1, 576, scale=0.3)
ind = ri(-1, Sk + 40, T, 1, K)
out, lse = dsa_ext.sparse_mla_fwd(q, kv, ind, 576 ** -0.5)
dq, dkv = dsa_ext.sparse_mla_bwd(q, kv, out, rn(T, Ha, 512), ind, lse, 576 ** -0.5)
dsa_ext.sparse_mla_bwd(q, kv, out, rn(T, Ha, 512), ind, lse, 576 ** -0.5, deterministic=True)
for cache in (torch.zeros(nb, bs, 1, 656, dtype=torch.uint8, device=dev),
              torch.zeros(nb, bs, 1, 576, dtype=torch.bfloat16, device=dev)):
    dsa_ext.mla_kv_cache_write(rn(nb * bs, 576), torch.arange(nb * bs, device=dev), cache)
    # H=16 (small head block, split-KV over few rows) and H=128 (64-head blocks)
    for heads, topk in ((Ha, K), (128, 1024)):
        dsa_ext.sparse_mla_decode(rn(2, 2, heads, 576, scale=0.3), cache,
                                  ri(-1, nb * bs + 20, 2, 2, topk), 576 ** -0.5)
# the opt-in Hopper wgmma kernels (64-head blocks), selected per call by the environment
os.environ["DSA_SPARSE_MLA_WGMMA"] = os.environ["DSA_MLA_DECODE_WGMMA"] = "1"
q64 = rn(T, 64, 576, scale=0.3)
dsa_ext.sparse_mla_fwd(q64, kv, ind, 576 ** -0.5)
dsa_ext.sparse_mla_decode(rn(2, 2, 64, 576, scale=0.3), cache, ri(-1, nb * bs + 20, 2, 2, K), 576 ** -0.5)
del os.environ["DSA_SPARSE_MLA_WGMMA"], os.environ["DSA_MLA_DECODE_WGMMA"]
if dev.type == "cuda":
    torch.cuda.synchronize()
print("sanitize smoke: all ops ran on", dev)
