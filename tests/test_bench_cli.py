"""The dsa-bench runner: `dsa-bench all --quick --json` on the CPU as a user runs it (a
subprocess), its JSON report against the "dsa-bench/1" schema, and the runner's handling of
failing cases and of a missing matplotlib."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dsa_ext.bench.cli import FAMILIES, SCHEMA, plot_e2e, validate_report
from dsa_ext.bench.common import Case
from dsa_ext.bench.runner import Roofline, TimingOptions, format_table, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The ops each case family exercises: when all of them have a CPU kernel, the family's rows
# must be there and must have run.
FAMILY_OPS = {
    "cache": ["fp8_quantize", "indexer_k_cache_write", "indexer_k_cache_gather", "mla_kv_cache_write",
              "mla_kv_cache_gather"],
    "indexer": ["indexer_logits", "paged_indexer_logits", "indexer_topk"],
    "topk": ["topk_indices", "topk_slot_ids"],
    "attn_fwd": ["sparse_mla_fwd"],
    "attn_bwd": ["sparse_mla_bwd"],
    "decode": ["sparse_mla_decode"],
    "e2e": ["fp8_quantize", "hadamard_fp8_quantize", "indexer_logits", "indexer_topk", "sparse_mla_fwd", "indexer_k_cache_write", "mla_kv_cache_write",
            "paged_indexer_logits", "topk_indices", "topk_slot_ids", "sparse_mla_decode"],
    "train": ["indexer_train_logits_bwd", "indexer_kl_loss_sparse", "indexer_kl_loss_dense"],
    "v4": ["v4_compress", "v4_compress_step", "fp8_quantize", "hadamard_fp8_quantize", "indexer_topk",
           "sparse_mla_fwd", "mla_kv_cache_write", "mla_kv_cache_gather", "indexer_k_cache_write",
           "paged_indexer_logits", "topk_indices", "topk_slot_ids"],
}


def has_cpu_kernels(ops):
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa::{op}", "CPU") for op in ops)


def test_family_table_covers_every_subcommand_family():
    assert {fam for fam, _ in FAMILIES.values()} == set(FAMILY_OPS)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "dsa_ext.bench.cli", "all", "--quick", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_cli_all_quick_writes_a_valid_report(cli_run):
    proc, report = cli_run
    validate_report(report)
    assert report["schema"] == SCHEMA and report["device"]["type"] == "cpu"
    assert report["settings"]["quick"] is True and report["settings"]["family"] == "all"
    assert "CPU: small quick shapes" in proc.stdout
    assert "ours us" in proc.stdout                                  # the table
    assert proc.stderr.count("[") >= len(report["rows"])              # one progress line per case


@pytest.mark.parametrize("family", sorted(FAMILY_OPS))
def test_cli_rows_for_every_family_with_ops(cli_run, family):
    _, report = cli_run
    if not has_cpu_kernels(FAMILY_OPS[family]):
        pytest.skip(f"{family}: ops not landed yet")
    rows = [r for r in report["rows"] if r["family"] == family]
    assert rows, f"no {family} rows although its ops exist (missing dsa_ext/bench/ module?)"
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["ours_us"] > 0 and r["reps"] >= 3
        for name, b in r["baselines"].items():
            assert b["error"] is None and b["us"] > 0 and b["speedup"] > 0, (r["name"], name)
        if r["flops"] > 0:
            assert r["tflops"] > 0
        if r["bytes"] > 0:
            assert r["gbs"] > 0
        assert r["roofline_fraction"] is None or r["roofline_fraction"] > 0


def test_cli_e2e_reports_trend(cli_run):
    proc, report = cli_run
    if not has_cpu_kernels(FAMILY_OPS["e2e"]):
        pytest.skip("e2e: ops not landed yet")
    lengths = sorted({r["shape"].get("L") for r in report["rows"] if r["family"] == "e2e" and r["status"] == "ok"})
    assert len(lengths) >= 3
    assert "e2e prefill:" in proc.stdout and "e2e decode:" in proc.stdout


def test_validate_report_rejects_malformed(cli_run):
    _, report = cli_run
    for mutate in (lambda r: r.update(schema="dsa-bench/0"),
                   lambda r: r.pop("git_commit"),
                   lambda r: r["rows"].append({"family": "x"}),
                   lambda r: r["device"]["roofline"].update(bandwidth_gbs=0)):
        bad = json.loads(json.dumps(report))
        mutate(bad)
        with pytest.raises(ValueError, match="dsa-bench report"):
            validate_report(bad)


CPU_ROOF = Roofline("test", 1.0, 1.0, 1.0, 10.0, "test")
FAST = TimingOptions(budget_s=0.001, min_reps=3, max_reps=5)


def test_failing_case_is_an_error_row_and_baselines_still_run():
    def missing_op():
        raise NotImplementedError("Could not run 'dsa::topk_indices' with arguments from the 'CPU' backend.\nmore")
    x = torch.randn(64, 64)
    case = Case("topk", "topk_indices", {"T": 64}, missing_op, flops=1e6, bytes=1e6,
                baselines={"torch.topk": lambda: x.topk(4), "broken": missing_op})
    row = run_case(case, torch.device("cpu"), CPU_ROOF, FAST)
    assert row["status"] == "error" and "NotImplementedError" in row["error"] and "more" not in row["error"]
    assert row["ours_us"] is None and row["tflops"] is None
    assert row["baselines"]["torch.topk"]["us"] > 0 and row["baselines"]["torch.topk"]["speedup"] is None
    assert "NotImplementedError" in row["baselines"]["broken"]["error"]
    assert "ERROR NotImplementedError" in format_table([row])


def test_run_case_rates_and_roofline_fraction():
    x = torch.randn(256, 256)
    case = Case("cache", "copy", {"N": 256}, lambda: x.clone(), flops=2e6, bytes=2 * x.nbytes,
                bound="memory", baselines={"same": lambda: x.clone()})
    row = run_case(case, torch.device("cpu"), CPU_ROOF, FAST)
    seconds = row["ours_us"] / 1e6
    assert row["status"] == "ok" and row["reps"] >= 3
    assert row["gbs"] == pytest.approx(2 * x.nbytes / seconds / 1e9)
    assert row["tflops"] == pytest.approx(2e6 / seconds / 1e12)
    assert row["roofline_fraction"] == pytest.approx(row["gbs"] / 10.0)
    assert row["baselines"]["same"]["speedup"] == pytest.approx(row["baselines"]["same"]["us"] / row["ours_us"])


def test_plot_e2e(tmp_path):
    rows = [{"family": "e2e", "name": n, "status": "ok", "shape": {"L": L, "K": 8, "H": 2},
             "ours_us": 10.0 * L, "baselines": {"dense": {"us": 0.1 * L * L, "speedup": 0.01 * L, "error": None}}}
            for n in ("dsa_prefill", "dsa_decode") for L in (64, 128, 256)]
    path = tmp_path / "e2e.png"
    message = plot_e2e(rows, str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in message and not path.exists()
    else:
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no e2e rows" in plot_e2e([], str(path))


@pytest.mark.parametrize("T,S,chunk_bytes", [(40, 40, 1 << 12), (40, 40, 1 << 30), (1, 70, 1 << 30), (9, 33, 1 << 10)])
def test_e2e_dense_baseline_is_causal_attention(T, S, chunk_bytes, gen):
    """The dense baseline the e2e speedups are measured against computes the right thing."""
    from dsa_ext.bench.e2e import dense_mla_attention
    from dsa_ext.reference.dense import causal_ranges, dense_masked_mla_attention, ranges_to_mask
    q = torch.randn(T, 3, 576, generator=gen).bfloat16()
    kv = torch.randn(S, 576, generator=gen).bfloat16()
    out = dense_mla_attention(q, kv, 0.05, 512, chunk_bytes)
    ref, _ = dense_masked_mla_attention(q, kv, ranges_to_mask(*causal_ranges(T, S), S), 0.05)
    assert out.shape == (T, 3, 512) and out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_e2e_summary_names_the_crossover():
    from dsa_ext.bench.e2e import summarize

    def row(name, L, speedup, ours_us):
        return {"family": "e2e", "name": name, "shape": {"L": L}, "ours_us": ours_us,
                "baselines": {"dense": {"us": ours_us * speedup, "speedup": speedup, "error": None}}}
    rows = [row("dsa_prefill", L, s, 3.0 * L) for L, s in ((256, 0.5), (512, 1.0), (1024, 2.0))]
    rows += [row("dsa_decode", L, s, 5.0) for L, s in ((256, 0.2), (512, 0.4), (1024, 0.8))]
    prefill, prefill_growth, decode, decode_growth = summarize(rows)
    assert "overtakes dense at L=1024" in prefill and "2.00x at L=1024" in prefill
    assert "does not overtake dense up to L=1024" in decode
    assert "L^1.00 (DSA) vs L^2.00 (dense)" in prefill_growth
    assert "L^0.00 (DSA) vs L^1.00 (dense)" in decode_growth


def test_collect_cases_skips_absent_and_reports_broken_modules(monkeypatch):
    import types

    import dsa_ext.bench.cli as cli

    broken = types.ModuleType("dsa_ext.bench._test_broken")
    broken.cases = lambda device, quick: (_ for _ in ()).throw(RuntimeError("cannot build inputs"))
    needs_dep = types.ModuleType("dsa_ext.bench._test_needs_dep")
    needs_dep.cases = lambda device, quick: (_ for _ in ()).throw(ModuleNotFoundError("no", name="missing_dep"))
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(sys.modules, needs_dep.__name__, needs_dep)
    for command, module in (("absent", "_test_absent"), ("broken", "_test_broken"), ("needs-dep", "_test_needs_dep")):
        monkeypatch.setitem(cli.FAMILIES, command, (command, module))
    messages = []
    cases, errors, skipped = cli.collect_cases("absent", torch.device("cpu"), True, say=messages.append)
    assert cases == [] and errors == [] and skipped[0]["module"] == "dsa_ext.bench._test_absent"
    for command in ("broken", "needs-dep"):
        cases, errors, skipped = cli.collect_cases(command, torch.device("cpu"), True, say=messages.append)
        assert cases == [] and skipped == [] and errors[0]["status"] == "error" and errors[0]["family"] == command
    assert "cannot build inputs" in messages[1] and "ModuleNotFoundError" in messages[2]


# ---- dsa-bench topk --sync: both DSA_TOPK_SYNC kernels side by side on a GPU ----------------

def test_topk_sync_variants_and_env_per_call(monkeypatch):
    """On a GPU, "both" times the mbarrier kernel as ours and the cluster-barrier kernel beside
    it; one mode times only that one; the CPU is unchanged. Each call sets DSA_TOPK_SYNC (the
    launcher reads it per launch) and restores the caller's value, also when the call raises."""
    from dsa_ext.bench import topk

    assert topk.sync_variants("cuda", "both") == ("mbarrier", ["cluster"])
    assert topk.sync_variants("cuda", "cluster") == ("cluster", [])
    assert topk.sync_variants("cuda", "mbarrier") == ("mbarrier", [])
    for sync in topk.SYNC_CHOICES:
        assert topk.sync_variants("cpu", sync) == (None, [])
    with pytest.raises(ValueError, match="topk sync"):
        topk.sync_variants("cuda", "fence")
    seen = []
    probe = topk.with_sync("cluster", lambda: seen.append(os.environ.get("DSA_TOPK_SYNC")) or "out")
    monkeypatch.delenv("DSA_TOPK_SYNC", raising=False)
    assert probe() == "out" and seen == ["cluster"] and "DSA_TOPK_SYNC" not in os.environ
    monkeypatch.setenv("DSA_TOPK_SYNC", "mbarrier")
    probe()
    assert seen == ["cluster", "cluster"] and os.environ["DSA_TOPK_SYNC"] == "mbarrier"

    def boom():
        assert os.environ["DSA_TOPK_SYNC"] == "cluster"
        raise RuntimeError("launch failed")
    with pytest.raises(RuntimeError, match="launch failed"):
        topk.with_sync("cluster", boom)()
    assert os.environ["DSA_TOPK_SYNC"] == "mbarrier"


def test_topk_cases_with_sync_on_cpu_are_unchanged(monkeypatch):
    """CPU cases carry no sync baseline whatever --sync says, and still compute the top-k."""
    from dsa_ext.bench import topk

    for sync in topk.SYNC_CHOICES:
        monkeypatch.setattr(topk, "SYNC", sync)
        case = topk._topk_case(torch.device("cpu"), 2, 300, 7, False, torch.Generator().manual_seed(0))
        assert list(case.baselines) == ["torch.topk", "torch.sort[:k]"]
        assert "DSA_TOPK_SYNC" not in (case.note or "")
        if has_cpu_kernels(["topk_indices"]):
            got = case.fn().sort(1).values
            want = case.baselines["torch.topk"]().indices.int().sort(1).values
            assert torch.equal(got, want)


def test_cli_sync_option(monkeypatch):
    """--sync is in the help, defaults to both, rejects other modes, and reaches the topk cases."""
    import dsa_ext.bench.cli as cli
    from dsa_ext.bench import topk

    proc = subprocess.run([sys.executable, "-m", "dsa_ext.bench.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])))
    assert proc.returncode == 0 and "--sync {both,mbarrier,cluster}" in proc.stdout and "DSA_TOPK_SYNC" in proc.stdout
    assert cli.parse_args(["topk"]).sync == "both"
    assert cli.parse_args(["topk", "--sync", "cluster"]).sync == "cluster"
    with pytest.raises(SystemExit):
        cli.parse_args(["topk", "--sync", "fence"])
    monkeypatch.setattr(topk, "SYNC", "both")
    monkeypatch.setattr(cli, "collect_cases", lambda *a, **k: ([], [], []))  # time nothing
    assert cli.main(["topk", "--device", "cpu", "--sync", "cluster"]) == 0
    assert topk.SYNC == "cluster"
