"""A small paged-cache manager for one DSA layer: what a serving loop needs to call the paged ops.

It owns the two caches of SPEC section 2 (the indexer K cache, `uint8 [num_blocks, block_size,
1, D + 4]`, and the MLA latent cache, FP8 `uint8 [.., 1, 656]` or bf16 `[.., 1, 576]`) and
the host-side bookkeeping: which blocks each sequence holds and how many tokens it has. New
tokens get slots (`slot = block * block_size + offset`) in order; `block_table`,
`context_lens` and `slot_ids` produce the int32 tensors the ops take.

    cache = PagedDSACache(num_blocks=64, block_size=64)
    seq = cache.add_sequence()
    cache.append([seq], [prompt_len], index_k, kv)          # prefill: writes both caches
    ...
    cache.append([seq], [1], index_k_new, kv_new)           # each decode step
    bt, lens = cache.block_table([seq]), cache.context_lens([seq])

Bookkeeping is plain Python on the host (allocation is not on the GPU's critical path and
must not be captured in a CUDA graph); the tensors it returns live on the cache's device.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

__all__ = ["PagedDSACache", "MLA_FP8_RECORD_BYTES"]

MLA_FP8_RECORD_BYTES = 656   # 512 FP8 + 4 fp32 scales + 64 bf16 (SPEC section 2)


class PagedDSACache:
    """Paged indexer-K and MLA caches with per-sequence block allocation.

    Args:
        num_blocks: blocks in each cache (both caches share the block ids).
        block_size: tokens per block (64 in DeepSeek-V3.2 serving).
        index_head_dim: the indexer's key dim D (128).
        kv_dim: the MLA latent row width (576 = 512 nope + 64 rope).
        kv_cache_dtype: "fp8" (FlashMLA's 656-byte records) or "bf16".
    """

    def __init__(self, num_blocks: int, block_size: int = 64, index_head_dim: int = 128,
                 kv_dim: int = 576, kv_cache_dtype: str = "fp8", device: Union[str, torch.device] = "cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        if kv_cache_dtype not in ("fp8", "bf16"):
            raise ValueError(f"kv_cache_dtype must be 'fp8' or 'bf16', got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8" and kv_dim != 576:
            raise ValueError(f"the FP8 MLA cache layout holds 576-wide rows, got kv_dim={kv_dim}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.index_head_dim, self.kv_dim = index_head_dim, kv_dim
        self.device = torch.device(device)
        self.index_k_cache = torch.zeros(num_blocks, block_size, 1, index_head_dim + 4,
                                         dtype=torch.uint8, device=self.device)
        if kv_cache_dtype == "fp8":
            self.kv_cache = torch.zeros(num_blocks, block_size, 1, MLA_FP8_RECORD_BYTES,
                                        dtype=torch.uint8, device=self.device)
        else:
            self.kv_cache = torch.zeros(num_blocks, block_size, 1, kv_dim, dtype=torch.bfloat16,
                                        device=self.device)
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))   # pop() hands out block 0 first
        self._blocks: Dict[int, List[int]] = {}
        self._lens: Dict[int, int] = {}
        self._next_id = 0

    # ---- sequences ----
    def add_sequence(self, seq_id: Optional[int] = None) -> int:
        """Register an empty sequence; returns its id."""
        if seq_id is None:
            seq_id = self._next_id
        if seq_id in self._blocks:
            raise ValueError(f"seq_id {seq_id} is already in the cache")
        self._next_id = max(self._next_id, seq_id + 1)
        self._blocks[seq_id], self._lens[seq_id] = [], 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        """Return the sequence's blocks to the free list."""
        self._free.extend(reversed(self._blocks.pop(self._check(seq_id))))
        del self._lens[seq_id]

    def seq_len(self, seq_id: int) -> int:
        return self._lens[self._check(seq_id)]

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    # ---- slots for new tokens ----
    def reserve(self, seq_ids: Sequence[int], num_new: Union[int, Sequence[int]]) -> torch.Tensor:
        """Allocate room for `num_new[i]` more tokens of `seq_ids[i]` and advance their lengths.
        Returns the slot_mapping of the new tokens, int64 `[sum(num_new)]`, sequence by sequence.
        Raises RuntimeError (allocating nothing) when the free blocks do not suffice."""
        counts = [num_new] * len(seq_ids) if isinstance(num_new, int) else list(num_new)
        if len(counts) != len(seq_ids):
            raise ValueError(f"num_new must have one entry per sequence ({len(seq_ids)}), got {len(counts)}")
        if any(n < 0 for n in counts):
            raise ValueError(f"num_new must be non-negative, got {counts}")
        needed = sum(self._blocks_for(self._lens[self._check(s)] + n) - len(self._blocks[s])
                     for s, n in zip(seq_ids, counts))
        if needed > len(self._free):
            raise RuntimeError(f"paged cache is full: {needed} blocks needed, {len(self._free)} free")
        slots: List[int] = []
        for s, n in zip(seq_ids, counts):
            blocks, start = self._blocks[s], self._lens[s]
            while len(blocks) < self._blocks_for(start + n):
                blocks.append(self._free.pop())
            slots.extend(blocks[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, start + n))
            self._lens[s] = start + n
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def write(self, slot_mapping: torch.Tensor, index_k: torch.Tensor, kv: torch.Tensor) -> None:
        """Write new tokens' indexer keys `[N, D]` (quantised to FP8 by the op) and MLA latent rows
        `[N, kv_dim]` bf16 at `slot_mapping` (negative slots are skipped)."""
        torch.ops.dsa.indexer_k_cache_write(index_k, slot_mapping, self.index_k_cache)
        torch.ops.dsa.mla_kv_cache_write(kv, slot_mapping, self.kv_cache)

    def append(self, seq_ids: Sequence[int], num_new: Union[int, Sequence[int]],
               index_k: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """`reserve` then `write`; index_k / kv hold the new tokens sequence by sequence."""
        slot_mapping = self.reserve(seq_ids, num_new)
        self.write(slot_mapping, index_k, kv)
        return slot_mapping

    # ---- tensors the paged ops take ----
    def block_table(self, seq_ids: Sequence[int], max_blocks: Optional[int] = None) -> torch.Tensor:
        """int32 `[B, max_blocks]`, padded with block 0 (never read past context_lens)."""
        widest = max((len(self._blocks[self._check(s)]) for s in seq_ids), default=0)
        width = max(widest, 1) if max_blocks is None else max_blocks
        if width < widest:
            raise ValueError(f"max_blocks={max_blocks} is smaller than a sequence's block count ({widest})")
        rows = [self._blocks[s] + [0] * (width - len(self._blocks[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(seq_ids), width)

    def context_lens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 `[B]`: cached tokens per sequence."""
        return torch.tensor([self._lens[self._check(s)] for s in seq_ids], dtype=torch.int32, device=self.device)

    def slot_ids(self, seq_id: int) -> torch.Tensor:
        """int64 `[seq_len]`: the slots of the sequence's tokens, in position order."""
        blocks, n = self._blocks[self._check(seq_id)], self._lens[seq_id]
        pos = torch.arange(n, dtype=torch.int64)
        table = torch.tensor(blocks, dtype=torch.int64).reshape(-1)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    # ---- reading back ----
    def gather_index_k(self, seq_ids: Sequence[int]):
        """The sequences' indexer keys, concatenated: FP8 `[sum(lens), D]` and fp32 scales."""
        return torch.ops.dsa.indexer_k_cache_gather(self.index_k_cache, self.block_table(seq_ids),
                                                    self.context_lens(seq_ids))

    def gather_kv(self, seq_id: int) -> torch.Tensor:
        """The sequence's latent rows, dequantised: bf16 `[seq_len, 1, kv_dim]`."""
        return torch.ops.dsa.mla_kv_cache_gather(self.kv_cache, self.slot_ids(seq_id))

    # ---- helpers ----
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _check(self, seq_id: int) -> int:
        if seq_id not in self._blocks:
            raise KeyError(f"seq_id {seq_id} is not in the cache")
        return seq_id
