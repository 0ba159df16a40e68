"""Training the lightning indexer from scratch by the dense warm-up loss, on a CPU in about two
minutes (SPEC section 7; DeepSeek-V3.2 report 2.1).

    python -m dsa_ext.train_demo            # or: dsa-bench train-demo

A toy DSA layer whose main attention concentrates on a few planted tokens per query: tokens
carry a query channel c(t), and a few "signal" tokens also carry a key channel m(s); the main
attention's query of t matches the latent row of every earlier signal token with m(s) = c(t)
(a handful per query), so almost all of its probability mass sits on them. The indexer sees
only the hidden states (query and key channel embeddings plus noise) and starts from random
initialisation. Each step draws a fresh sequence, runs `DSAPath.training_forward(stage=
"dense")` (attention over every causal key, `indexer_kl_loss_dense` streamed by key blocks)
and steps Adam on the indexer's parameters only (the warm-up freezes the main model). It
prints the KL curve and, on a held-out sequence, the share of the main attention's
probability mass that the indexer's top-k (its FP8 inference path, `indexer_topk`) captures,
before and after. A short sparse stage follows (`stage="sparse"`, the loss over the selected
keys only).
"""
from __future__ import annotations

import argparse
import math
import time
from typing import List, NamedTuple, Optional

import torch

from .modules import DSAPath, rope_cos_sin
from .reference.dense import causal_ranges
from .reference.training import dense_attention_target, row_range_mask

__all__ = ["ToyTask", "DemoResult", "captured_mass", "run_demo", "main"]


class ToySequence(NamedTuple):
    x: torch.Tensor          # [T, dim] hidden states (the indexer's input, also its qr)
    q_latent: torch.Tensor   # [T, Hm, d] the main attention's queries
    kv_latent: torch.Tensor  # [T, d] its latent rows
    cos: torch.Tensor
    sin: torch.Tensor


class ToyTask:
    """The fixed "model" of the toy layer (channel embeddings and latent directions) and a
    sampler of sequences from it."""

    def __init__(self, *, seq_len=512, dim=64, channels=8, main_heads=4, latent_dim=64,
                 signal_rate=0.04, match_score=12.0, noise=0.3, rope_dim=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.T, self.dim, self.M, self.Hm, self.d = seq_len, dim, channels, main_heads, latent_dim
        self.signal_rate, self.noise, self.rope_dim = signal_rate, noise, rope_dim
        self.sm_scale = latent_dim ** -0.5
        self.query_emb = torch.randn(channels, dim, generator=g)
        self.key_emb = torch.randn(channels, dim, generator=g)
        # Orthonormal channel directions of the main attention: a matching pair scores
        # match_score, any other pair about 0.
        u, _ = torch.linalg.qr(torch.randn(latent_dim, channels, generator=g))
        self.directions = u.T.contiguous()                                   # [M, d]
        self.query_gain = match_score / self.sm_scale

    def sample(self, g: torch.Generator) -> ToySequence:
        T, M = self.T, self.M
        c = torch.randint(0, M, (T,), generator=g)                           # query channels
        signal = torch.rand(T, generator=g) < self.signal_rate
        m = torch.randint(0, M, (T,), generator=g)                           # key channels
        signal[:M], m[:M] = True, torch.arange(M)                            # every channel has one early
        x = (self.query_emb[c] + signal[:, None] * self.key_emb[m]
             + self.noise * torch.randn(T, self.dim, generator=g))
        head_jitter = 0.1 * torch.randn(T, self.Hm, self.d, generator=g)
        q_latent = self.query_gain * (self.directions[c][:, None, :] + head_jitter)
        kv_latent = (signal[:, None] * self.directions[m]
                     + 0.05 * torch.randn(T, self.d, generator=g))
        cos, sin = rope_cos_sin(torch.arange(T), self.rope_dim)
        return ToySequence(x, q_latent.bfloat16().contiguous(), kv_latent.bfloat16().contiguous(),
                           cos, sin)

    def layer(self, topk: int, seed: int) -> DSAPath:
        torch.manual_seed(seed)
        return DSAPath(softmax_scale=self.sm_scale, d_v=self.d, dim=self.dim,
                       q_lora_rank=self.dim, n_heads=4, head_dim=128, rope_dim=self.rope_dim,
                       topk=topk)


@torch.no_grad()
def captured_mass(path: DSAPath, seq: ToySequence, sm_scale: float) -> float:
    """Mean over the queries that have more than `topk` causal keys of the main attention's
    probability mass (head-averaged, over all causal keys) on the keys the indexer's FP8 top-k
    selects. Queries with at most topk keys select everything and are left out."""
    T = seq.x.shape[0]
    ks, ke = causal_ranges(T, T)
    p = dense_attention_target(seq.q_latent, seq.kv_latent[:, None, :],
                               row_range_mask(ks, ke, T), sm_scale)              # [T, T]
    q, k = path.indexer.project(seq.x, seq.x, seq.cos, seq.sin)
    idx = path.indexer.select(seq.x, q, k, ks, ke).long()                       # [T, K]
    taken = torch.where(idx >= 0, p.gather(1, idx.clamp_min(0)), 0.0).sum(1)
    rows = (ke - ks).long() > path.indexer.topk
    return float(taken[rows].mean())


class DemoResult(NamedTuple):
    kl_curve: List[float]
    sparse_curve: List[float]
    captured_before: float
    captured_after: float
    seconds: float


def run_demo(steps: int = 80, sparse_steps: int = 20, seq_len: int = 512, topk: int = 16,
             lr: float = 3e-3, seed: int = 0, log_every: int = 10,
             log: Optional[callable] = print) -> DemoResult:
    log = log or (lambda *_: None)
    task = ToyTask(seq_len=seq_len, seed=seed)
    path = task.layer(topk, seed)
    g = torch.Generator().manual_seed(seed + 1)
    held_out = task.sample(torch.Generator().manual_seed(seed + 12345))
    before = captured_mass(path, held_out, task.sm_scale)
    log(f"toy DSA layer: T={seq_len}, {task.M} channels, indexer H=4 D=128, top-k {topk}")
    log(f"captured main-attention mass by the indexer's top-{topk} before training: {before:.4f}")
    opt = torch.optim.Adam(path.indexer.parameters(), lr=lr)
    t0 = time.time()
    curve, sparse_curve = [], []

    def step(stage):
        seq = task.sample(g)
        outp = path.training_forward(seq.x, seq.x, seq.q_latent, seq.kv_latent, seq.cos, seq.sin,
                                     stage=stage, reduction="mean")
        opt.zero_grad(set_to_none=True)
        outp.indexer_loss.backward()
        opt.step()
        return float(outp.indexer_loss.detach())

    for i in range(steps):
        curve.append(step("dense"))
        if i % log_every == 0 or i == steps - 1:
            log(f"  warm-up step {i:4d}  KL(p || r) per query = {curve[-1]:.4f}  ({time.time() - t0:.0f} s)")
    for i in range(sparse_steps):
        sparse_curve.append(step("sparse"))
        if i % log_every == 0 or i == sparse_steps - 1:
            log(f"  sparse  step {i:4d}  KL over the top-{topk} = {sparse_curve[-1]:.4f}")
    after = captured_mass(path, held_out, task.sm_scale)
    seconds = time.time() - t0
    log(f"captured main-attention mass by the indexer's top-{topk} after training: {after:.4f}"
        f"  ({steps} warm-up + {sparse_steps} sparse steps, {seconds:.0f} s)")
    return DemoResult(curve, sparse_curve, before, after, seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--sparse-steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    run_demo(a.steps, a.sparse_steps, a.seq_len, a.topk, a.lr, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
