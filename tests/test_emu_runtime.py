"""The emulator itself (csrc/emu): each hazard it claims to find is planted in a small kernel
(csrc/emu/families/selftest_emu.cpp) and must be reported with the right kind, and the
correct version of each kernel must run clean and compute the right result."""
import pytest
import torch

import emulator as E

pytestmark = pytest.mark.emu
P = E.ptr


@pytest.fixture(scope="module")
def lib():
    return E.load("selftest")


def kinds(reports):
    return {r["kind"] for r in reports}


def test_block_sum_clean_and_missing_barrier(lib, gen):
    x = torch.randn(4 * 64, generator=gen)
    out = torch.full((4,), float("nan"))
    rep, rc = E.run(lib.emu_selftest_block_sum, P(x), P(out), 64, 64, 4, 0, 0, buffers=[x, out], lib=lib)
    assert rc == 0 and rep == []
    torch.testing.assert_close(out, x.view(4, 64).sum(1), rtol=1e-5, atol=1e-5)
    rep, _ = E.run(lib.emu_selftest_block_sum, P(x), P(out), 64, 64, 4, 1, 0, buffers=[x, out], lib=lib)
    assert "race" in kinds(rep)  # thread 0 reads what the others write, with no barrier
    rep, _ = E.run(lib.emu_selftest_block_sum, P(x), P(out), 64, 64, 4, 0, 1, buffers=[x, out], lib=lib)
    assert kinds(rep) == {"uninit-shared"}
    assert "tid 0" in rep[0]["text"] and "block_sum" in rep[0]["kernel"]


def test_warp_shuffles_and_member_mask(lib, gen):
    x = torch.randn(3 * 32, generator=gen)
    out = torch.full((3,), float("nan"))
    rep, _ = E.run(lib.emu_selftest_warp_sum, P(x), P(out), 3, 0, buffers=[x, out], lib=lib)
    assert rep == []
    torch.testing.assert_close(out, x.view(3, 32).sum(1), rtol=1e-5, atol=1e-5)
    rep, _ = E.run(lib.emu_selftest_warp_sum, P(x), P(out), 3, 1, buffers=[x, out], lib=lib)
    assert "divergent-collective" in kinds(rep)


def test_barrier_not_reached_by_all(lib):
    out = torch.zeros(64)
    rep, _ = E.run(lib.emu_selftest_divergent_barrier, P(out), buffers=[out], lib=lib)
    assert kinds(rep) == {"barrier-deadlock"}
    rep, _ = E.run(lib.emu_selftest_early_exit, P(out), buffers=[out], lib=lib)
    assert kinds(rep) == {"barrier-deadlock"}


@pytest.mark.parametrize("shared,kind", [(0, "oob-global"), (1, "oob-shared")])
def test_out_of_bounds(lib, gen, shared, kind):
    x = torch.randn(32, generator=gen)
    out = torch.zeros(32)
    rep, _ = E.run(lib.emu_selftest_off_by_one, P(x), P(out), 32, shared, buffers=[x, out], lib=lib)
    assert kinds(rep) == {kind} and "tid 31" in rep[0]["text"]


def test_cp_async_destination_pending_until_wait(lib, gen):
    x = torch.randn(64 * 4, generator=gen)
    out = torch.full((64,), float("nan"))
    rep, _ = E.run(lib.emu_selftest_async_copy, P(x), P(out), 64, 0, buffers=[x, out], lib=lib)
    assert rep == []
    torch.testing.assert_close(out, x.view(64, 4)[:, 0].roll(-1))
    rep, _ = E.run(lib.emu_selftest_async_copy, P(x), P(out), 64, 1, buffers=[x, out], lib=lib)
    assert kinds(rep) == {"pending-cp-async"}


def test_wgmma_accumulators_and_proxy_fence(lib):
    out = torch.full((128,), float("nan"))
    rep, _ = E.run(lib.emu_selftest_async_proxy, P(out), 128, 0, 1, buffers=[out], lib=lib)
    assert rep == []
    torch.testing.assert_close(out, torch.arange(1, 129).remainder(128).float())
    rep, _ = E.run(lib.emu_selftest_async_proxy, P(out), 128, 1, 1, buffers=[out], lib=lib)
    assert kinds(rep) == {"pending-wgmma"}
    rep, _ = E.run(lib.emu_selftest_async_proxy, P(out), 128, 0, 0, buffers=[out], lib=lib)
    assert kinds(rep) == {"proxy-fence"}


def test_atomics_are_not_races(lib):
    c = torch.zeros(1, dtype=torch.int32)
    rep, _ = E.run(lib.emu_selftest_atomic_count, P(c), 128, 3, buffers=[c], lib=lib)
    assert rep == [] and c.item() == 384


def test_launch_limits_like_cuda(lib):
    out = torch.zeros(64)
    rep, rc = E.run(lib.emu_selftest_too_much_smem, P(out), buffers=[out], lib=lib)
    assert rc != 0 and kinds(rep) == {"bad-launch"}


def test_counters(lib, gen):
    lib.emu_clear_counters()
    x = torch.randn(2 * 64, generator=gen)
    out = torch.zeros(2)
    E.run(lib.emu_selftest_block_sum, P(x), P(out), 64, 64, 2, 0, 0, buffers=[x, out], lib=lib)
    c = E.counters(lib)["block_sum"]
    assert c["launches"] == 1 and c["ctas"] == 2 and c["threads"] == 128 and c["barriers"] == 2
    # each CTA: 64 floats loaded by 2 warps (2 requests, 8 sectors), one coalesced smem store
    # per warp (2 requests, 1 wavefront each), 64 scalar smem loads by thread 0
    assert c["gmem_bytes_read"] == 2 * 64 * 4 and c["gmem_bytes_written"] == 2 * 4
    assert c["smem_requests"] == 2 * (2 + 64) and c["smem_wavefronts"] == c["smem_requests"]
