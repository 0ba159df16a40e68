"""vLLM's DeepSeek-V3.2 sparse-attention custom ops (``vllm/_custom_ops.py``,
``csrc/torch_bindings.cpp``) over ``torch.ops.dsa``, with vLLM's names and argument order:

* ``indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)``
  -- quantise indexer keys into the paged indexer K cache (``kv_cache_dtype`` is vLLM's
  ``scale_fmt``: ``"ue8m0"`` gives power-of-two scales);
* ``cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)``
  -- gather the cached keys of a prefill chunk into ``dst_k`` / ``dst_scale``, in place;
* ``top_k_per_row_prefill(logits, rowStarts, rowEnds, indices, numRows, stride0, stride1, topK)``
* ``top_k_per_row_decode(logits, next_n, seq_lens, indices, numRows, stride0, stride1, topK)``
* ``persistent_topk(logits, lengths, output, workspace, k, max_seq_len)``

Use as ``from dsa_ext.compat import vllm as ops`` in place of ``from vllm import _custom_ops as
ops`` (calls written as ``torch.ops._C.<name>`` must be pointed at these functions).

Conventions kept from vLLM: the cache is ``uint8 [num_blocks, block_size, D + 4]`` (the byte
layout of ours: per block the FP8 keys, then one fp32 scale per token); outputs are written in
place; prefill top-k indices are relative to the row's start (``column - rowStarts[r]``);
decode row r of sequence ``b = r // next_n`` sees ``seq_lens[b] - next_n + r % next_n + 1``
columns (a ``[B, next_n]`` seq_lens gives each row's length directly); ``-1`` pads a row with
fewer than topK columns.

Differences a user should know:

* top-k is exact and deterministic (ties go to the smaller column); vLLM's order is unspecified
  too, so only the selected set is comparable.
* ``cp_gather_indexer_k_quant_cache`` is PyTorch indexing over byte views, not
  ``dsa.indexer_k_cache_gather``: that op sizes its output from ``seq_lens`` (one host
  synchronisation on CUDA) where vLLM's gather writes into a caller-sized buffer without one.
  Rows past ``cu_seq_lens[-1]`` are left untouched; a token whose block id is outside the cache
  reads as zeros.
* a logits view with a column stride other than 1 is copied before the top-k.
* not served (``NotImplementedError``): the bf16 / fp16 indexer cache (vLLM's
  ``indexer_k_cache``), and ``quant_block_size != head_dim`` (several scales per token).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["indexer_k_quant_and_cache", "cp_gather_indexer_k_quant_cache",
           "top_k_per_row_prefill", "top_k_per_row_decode", "persistent_topk"]


def _check(cond: bool, msg: str) -> None:
    # vLLM's TORCH_CHECKs surface as RuntimeError
    if not cond:
        raise RuntimeError(msg)


def _cache_4d(kv_cache: Tensor, head_dim: int) -> Tensor:
    """vLLM's ``[num_blocks, block_size, D + 4]`` indexer cache as our ``[.., 1, D + 4]`` view."""
    if kv_cache.dtype in (torch.bfloat16, torch.float16):
        raise NotImplementedError(
            "kv_cache: a bf16 / fp16 indexer K cache (vLLM's unquantised indexer_k_cache) is not "
            "served by dsa_ext; allocate the uint8 FP8 cache [num_blocks, block_size, head_dim + 4]")
    _check(kv_cache.dim() in (3, 4), f"kv_cache must be [num_blocks, block_size, cache_stride], got {kv_cache.dim()}-D")
    cache = kv_cache if kv_cache.dim() == 4 else kv_cache.unsqueeze(2)
    if cache.dtype != torch.uint8:
        cache = cache.view(torch.uint8)
    _check(cache.shape[2] == 1, "kv_cache must hold one K head")
    _check(cache.shape[3] == head_dim + 4,
           f"kv_cache cache_stride must be head_dim + 4 = {head_dim + 4} bytes (FP8 key + fp32 scale), "
           f"got {cache.shape[3]}")
    return cache


def indexer_k_quant_and_cache(k: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                              quant_block_size: int, kv_cache_dtype: str) -> None:
    """Quantise ``k [num_tokens, head_dim]`` (bf16 / fp32) to FP8 with one fp32 scale per token
    and write it at ``slot_mapping [num_tokens]`` (int64; negative = skip) into ``kv_cache``
    ``uint8 [num_blocks, block_size, head_dim + 4]``, in place. ``kv_cache_dtype == "ue8m0"``
    rounds the scale ``max(amax, 1e-4) / 448`` up to a power of two."""
    head_dim = k.shape[-1]
    _check(k.device == kv_cache.device, "k and kv_cache must be on the same device")
    _check(k.device == slot_mapping.device, "k and slot_mapping must be on the same device")
    _check(quant_block_size > 0 and head_dim % quant_block_size == 0,
           "head_dim must be divisible by quant_block_size")
    if quant_block_size != head_dim:
        raise NotImplementedError(
            f"quant_block_size={quant_block_size}: several scales per key (quant_block_size < "
            f"head_dim = {head_dim}) do not fit dsa_ext's indexer cache (one fp32 scale per token)")
    cache = _cache_4d(kv_cache, head_dim)
    torch.ops.dsa.indexer_k_cache_write(k.reshape(-1, head_dim), slot_mapping, cache,
                                        kv_cache_dtype == "ue8m0")


def cp_gather_indexer_k_quant_cache(kv_cache: Tensor, dst_k: Tensor, dst_scale: Tensor,
                                    block_table: Tensor, cu_seq_lens: Tensor) -> None:
    """Gather sequence b's first ``cu_seq_lens[b+1] - cu_seq_lens[b]`` cached keys (token i from
    block ``block_table[b, i // block_size]``) into rows ``cu_seq_lens[b]..`` of ``dst_k
    [T, head_dim]`` (float8_e4m3fn or uint8) and ``dst_scale [T, 4]`` uint8 (the fp32 scale's
    bytes; a ``[T]`` / ``[T, 1]`` fp32 tensor is accepted too), in place, without a host
    synchronisation."""
    _check(dst_k.dim() == 2, f"dst_k must be [num_tokens, head_dim], got {dst_k.dim()}-D")
    T, D = dst_k.shape
    cache = _cache_4d(kv_cache, D)
    _check(block_table.dim() == 2, "block_table must be [batch_size, max_blocks]")
    _check(cu_seq_lens.dim() == 1 and cu_seq_lens.shape[0] == block_table.shape[0] + 1,
           f"cu_seq_lens must be [batch_size + 1] = [{block_table.shape[0] + 1}]")
    for name, t in (("dst_k", dst_k), ("dst_scale", dst_scale), ("block_table", block_table),
                    ("cu_seq_lens", cu_seq_lens)):
        _check(t.device == kv_cache.device, f"{name} must be on the device of kv_cache")
    _check(block_table.dtype == torch.int32 and cu_seq_lens.dtype == torch.int32,
           "block_table and cu_seq_lens must be int32")
    _check(dst_k.dtype in (torch.float8_e4m3fn, torch.uint8), f"dst_k must be FP8 or uint8, got {dst_k.dtype}")
    scale_bytes = dst_scale.view(torch.uint8) if dst_scale.dtype != torch.uint8 else dst_scale
    _check(scale_bytes.numel() == T * 4 and scale_bytes.is_contiguous(),
           f"dst_scale must hold 4 bytes (one fp32 scale) per row of dst_k: [{T}, 4] uint8")
    scale_bytes = scale_bytes.view(T, 4)
    nb, bs = cache.shape[0], cache.shape[1]
    B, max_blocks = block_table.shape
    if T == 0:
        return

    # row r belongs to sequence b with cu[b] <= r < cu[b+1]; rows past cu[B] are not touched
    rows = torch.arange(T, device=dst_k.device)
    cu = cu_seq_lens.long()
    seq = torch.searchsorted(cu[1:].contiguous(), rows, right=True)
    in_batch = seq < B
    seq_c = seq.clamp(max=max(B - 1, 0))
    pos = rows - cu[seq_c]
    logical = pos // bs
    in_table = (logical >= 0) & (logical < max_blocks)
    blk = block_table.long()[seq_c, logical.clamp(0, max(max_blocks - 1, 0))] if B > 0 and max_blocks > 0 \
        else torch.zeros_like(rows)
    readable = in_batch & in_table & (blk >= 0) & (blk < nb)
    blk_c = blk.clamp(0, max(nb - 1, 0))
    off = pos.remainder(bs)

    # per page: bs*D value bytes, then bs*4 scale bytes (a view for a dense cache, else a
    # copy); an empty cache reads as one zero page
    pages = cache.reshape(nb, bs * (D + 4)) if nb > 0 else cache.new_zeros((1, bs * (D + 4)))
    for src, dst, width in ((pages[:, :bs * D], dst_k.view(torch.uint8), D),
                            (pages[:, bs * D:], scale_bytes, 4)):
        # moved as the widest machine words the layout allows (8x fewer elements than bytes)
        word = _widest_word(src, dst, width)
        fill = src.view(word).unflatten(1, (bs, -1))[blk_c, off].masked_fill_(~readable[:, None], 0)
        dst_w = dst.view(word)
        dst_w.copy_(torch.where(in_batch[:, None], fill, dst_w))


def _widest_word(src: Tensor, dst: Tensor, width: int) -> torch.dtype:
    """The widest integer dtype whose view of both byte tensors is legal: the row width, every
    stride and the storage offsets divide by its size. Bytes under torch.compile, which does not
    trace storage_offset() (same result, more elements)."""
    if torch.compiler.is_compiling():
        return torch.uint8
    for word, size in ((torch.int64, 8), (torch.int32, 4), (torch.uint8, 1)):
        if width % size == 0 and all(
                t.storage_offset() % size == 0 and t.stride(0) % size == 0 and t.size(-1) % size == 0
                for t in (src, dst)):
            return word
    return torch.uint8


def _rows_view(logits: Tensor, num_rows: int, stride0: int, stride1: int) -> Tensor:
    """The ``[numRows, S]`` logits the vLLM kernel reads through (stride0, stride1), with the
    unit column stride our top-k needs."""
    _check(logits.dim() == 2, f"logits must be 2-D, got {logits.dim()}-D")
    _check(logits.dtype == torch.float32, f"logits must be float32, got {logits.dtype}")
    _check(0 <= num_rows <= logits.shape[0], f"numRows must be in [0, {logits.shape[0]}], got {num_rows}")
    view = logits[:num_rows]
    if (stride0, stride1) != tuple(view.stride()):
        view = torch.as_strided(logits, (num_rows, logits.shape[1]), (stride0, stride1),
                                logits.storage_offset())
    return view if view.stride(1) == 1 else view.contiguous()


def _check_indices(indices: Tensor, num_rows: int, top_k: int, logits: Tensor) -> None:
    _check(indices.device == logits.device, "indices must be on the device of logits")
    _check(indices.dtype == torch.int32, f"indices must be int32, got {indices.dtype}")
    _check(indices.dim() == 2 and indices.shape[0] >= num_rows and indices.shape[1] >= top_k,
           f"indices must be at least [numRows, topK] = [{num_rows}, {top_k}], got {tuple(indices.shape)}")
    _check(top_k >= 1, f"topK must be >= 1, got {top_k}")


def top_k_per_row_prefill(logits: Tensor, rowStarts: Tensor, rowEnds: Tensor, indices: Tensor,
                          numRows: int, stride0: int, stride1: int, topK: int) -> None:
    """Row r: the topK largest logits among columns ``rowStarts[r] <= c < rowEnds[r]``, written
    to ``indices[r, :topK]`` as ``c - rowStarts[r]`` (``-1`` pads a short row), in place."""
    view = _rows_view(logits, numRows, stride0, stride1)
    _check_indices(indices, numRows, topK, logits)
    if numRows == 0:
        return
    ks = rowStarts[:numRows].to(torch.int32).contiguous()
    ke = rowEnds[:numRows].to(torch.int32).contiguous()
    cols = torch.ops.dsa.topk_indices(view, topK, ks, ke, False)
    rel = torch.where(cols >= 0, cols - ks[:, None], cols)
    indices[:numRows, :topK].copy_(rel)


def _decode_row_ends(next_n: int, seq_lens: Tensor, num_rows: int) -> Tensor:
    if seq_lens.dim() == 2:
        _check(seq_lens.numel() >= num_rows, f"seq_lens [B, next_n] must cover numRows = {num_rows} rows")
        return seq_lens.reshape(-1)[:num_rows].to(torch.int32).contiguous()
    _check(seq_lens.dim() == 1, f"seq_lens must be [B] or [B, next_n], got {seq_lens.dim()}-D")
    _check(next_n >= 1, f"next_n must be >= 1, got {next_n}")
    r = torch.arange(num_rows, device=seq_lens.device)
    _check(seq_lens.shape[0] * next_n >= num_rows, f"seq_lens [B] must cover numRows = {num_rows} rows")
    return (seq_lens.long()[r // next_n] - next_n + r % next_n + 1).to(torch.int32)


def top_k_per_row_decode(logits: Tensor, next_n: int, seq_lens: Tensor, indices: Tensor,
                         numRows: int, stride0: int, stride1: int, topK: int) -> None:
    """Row r of sequence ``r // next_n``: the topK largest logits among its first
    ``seq_lens[b] - next_n + r % next_n + 1`` columns (``seq_lens [B, next_n]``: its own length),
    written to ``indices[r, :topK]`` (``-1`` pads), in place."""
    view = _rows_view(logits, numRows, stride0, stride1)
    _check_indices(indices, numRows, topK, logits)
    if numRows == 0:
        return
    ke = _decode_row_ends(next_n, seq_lens, numRows)
    ks = torch.zeros_like(ke)
    indices[:numRows, :topK].copy_(torch.ops.dsa.topk_indices(view, topK, ks, ke, False))


def persistent_topk(logits: Tensor, lengths: Tensor, output: Tensor, workspace: Optional[Tensor],
                    k: int, max_seq_len: int) -> None:
    """Row r: the k largest logits among its first ``lengths`` columns (``lengths`` holds one
    length per row, ``[rows]`` or ``[B, next_n]``), written to ``output[r, :k]`` (``-1`` pads),
    in place. ``workspace`` and ``max_seq_len`` are scheduling inputs of vLLM's kernel and are
    not needed here."""
    num_rows = logits.shape[0]
    _check(lengths.numel() == num_rows, f"lengths must hold one length per logits row ({num_rows}), "
                                        f"got {lengths.numel()}")
    view = _rows_view(logits, num_rows, logits.stride(0), logits.stride(1))
    _check_indices(output, num_rows, k, logits)
    ke = lengths.reshape(-1).to(torch.int32).contiguous()
    output[:num_rows, :k].copy_(torch.ops.dsa.topk_indices(view, k, torch.zeros_like(ke), ke, False))
