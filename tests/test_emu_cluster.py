"""The emulator's cluster model (csrc/emu): mbarriers (init, remote arrive, arrive.expect_tx,
try_wait.parity), st.async with transaction bytes, the split cluster barrier and race
detection across a cluster's CTAs through distributed shared memory. The correct kernel
(csrc/emu/families/cluster_emu.cpp, mode 0) must run clean in clusters of 1..16 CTAs and
compute the right sums; each planted hazard must be reported with the right kind and never
hang."""
import pytest
import torch

import emulator as E

pytestmark = pytest.mark.emu
P = E.ptr


@pytest.fixture(scope="module")
def lib():
    return E.load("cluster")


def kinds(reports):
    return {r["kind"] for r in reports}


def push_pull(lib, n, mode, clusters=2, threads=64, gen=None):
    vals = torch.randint(0, 1 << 20, (clusters * n,), dtype=torch.int32, generator=gen)
    out = torch.full((clusters * 3 * n,), -7, dtype=torch.int32)
    reports = []
    for c in range(clusters):  # one launch per cluster: each has its own vals/out window
        v, o = vals[c * n:(c + 1) * n], out[c * 3 * n:(c + 1) * 3 * n]
        rep, rc = E.run(lib.emu_cluster_push_pull, P(v), P(o), 1, n, threads, mode, buffers=[v, o], lib=lib)
        assert rc == 0
        reports += rep
    return vals.view(clusters, n), out.view(clusters, 3, n), reports


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_push_pull_clean(lib, gen, n):
    vals, out, reports = push_pull(lib, n, 0, gen=gen)
    assert reports == []
    for c in range(vals.shape[0]):
        total = vals[c].sum()
        for r in range(n):
            assert out[c, 0, r] == total - vals[c, r]  # the peers' pushed values
            assert out[c, 1, r] == sum(1000 * q for q in range(n) if q != r)  # their data[0] (DSMEM)


@pytest.mark.parametrize("mode,kind,n", [
    (1, "mbarrier", 4),            # more bytes completed than expect_tx announced
    (2, "barrier-deadlock", 4),    # a byte count that never arrives: the wait never completes
    (3, "mbarrier", 2),            # peers use the barriers with no fence.mbarrier_init + cluster barrier
    (4, "race", 2),                # the st.async destination read before the mbarrier wait
    (5, "race", 4),                # a peer's shared memory read with no synchronisation at all
    (6, "mbarrier", 2),            # remote arrive at .cta scope
    (7, "barrier-deadlock", 2),    # one arrival fewer than the barrier's count
    (8, "race", 2),                # a relaxed cluster-barrier arrive orders no data
])
def test_planted_hazards(lib, gen, mode, kind, n):
    _, _, reports = push_pull(lib, n, mode, clusters=1, gen=gen)
    assert kind in kinds(reports), reports
    if kind == "race":
        assert any("distributed shared memory" in r["text"] or "cta" in r["text"] for r in reports if r["kind"] == "race")


def test_deadlock_report_names_the_barrier(lib, gen):
    _, _, reports = push_pull(lib, 2, 2, clusters=1, gen=gen)
    text = " ".join(r["text"] for r in reports if r["kind"] == "barrier-deadlock")
    assert "mbarrier.try_wait" in text and "tx-count 8" in text
