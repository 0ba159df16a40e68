"""`dsa-bench`: the dsa_ext microbenchmarks and the end-to-end DSA-vs-dense comparison.

    dsa-bench all                      # every family, SPEC section 6 shapes on a GPU
    dsa-bench topk --graphs            # one family; CUDA graphs where launch overhead dominates
    dsa-bench topk --sync cluster      # top-k: time one DSA_TOPK_SYNC mode (default: both, GPU)
    dsa-bench all --quick --json r.json --plot e2e.png
    python -m dsa_ext.bench.cli ...    # the same without the console script

Subcommands pick the case family: indexer, topk, attn-fwd, attn-bwd, decode, cache, e2e, train,
v4 (DeepSeek-V4: the compressor and whole V4 layers), all. `dsa-bench train-demo [--steps N ...]` instead runs `dsa_ext.train_demo` (the indexer
trained by the dense warm-up loss on a toy layer, on the CPU in about two minutes).
Cases come from the family modules `dsa_ext.bench.{cache,indexer,topk,sparse_mla,mla_decode,e2e,training,v4}`
(`cases(device, quick) -> list[Case]`, see common.py); a module that is absent is skipped with
a message, and a case that raises (an op not built yet, out of memory) becomes an error row
while the run goes on. The device is CUDA when available (`--device` to choose); on a GPU the
shapes are SPEC section 6's, on the CPU (or with `--quick`) small ones. Timing and rooflines:
see runner.py. The table shows, per case, our median time, TFLOP/s, GB/s, the fraction of the
device's roofline (compute or memory, whichever the case is bound by), and each baseline's
median with our speedup over it. Progress goes to stderr, one line per case.

JSON report (`--json PATH`), schema "dsa-bench/1":

    {
      "schema": "dsa-bench/1",
      "timestamp": str,            # ISO 8601, UTC
      "git_commit": str,           # `git rev-parse HEAD` (+ "-dirty"), else "dsa_ext-<version>"
      "dsa_ext_version": str,
      "torch_version": str,
      "cuda_version": str | null,  # torch.version.cuda
      "argv": [str],
      "settings": {"family": str, "quick": bool, "graphs": bool, "warmup": int, "min_reps": int,
                   "max_reps": int, "budget_s": float, "topk_sync": str},
      "device": {"type": "cuda" | "cpu", "name": str,
                 "roofline": {"name": str, "bf16_tflops": float, "fp8_tflops": float,
                              "fp32_tflops": float, "bandwidth_gbs": float, "source": str}},
      "skipped": [{"module": str, "reason": str}],   # case modules absent or failing to load
      "rows": [{
        "family": str, "name": str, "shape": {str: int},
        "status": "ok" | "error", "error": str | null, "note": str | null,
        "ours_us": float | null,   # median microseconds of our op (null on error)
        "reps": int | null, "graphed": bool,
        "flops": float, "bytes": float, "bound": "compute" | "memory", "flops_dtype": str,
        "tflops": float | null, "gbs": float | null, "roofline_fraction": float | null,
        "baselines": {name: {"us": float | null, "speedup": float | null, "error": str | null}}
      }]
    }

`speedup` is baseline time / our time (> 1: we are faster). Numbers that do not apply (no
FLOPs, an error) are null. `validate_report` checks a report against this schema.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import Case
from .runner import TimingOptions, detect_roofline, error_text, format_table, progress, run_case

__all__ = ["main", "SCHEMA", "FAMILIES", "validate_report", "collect_cases"]

SCHEMA = "dsa-bench/1"

# subcommand -> (case family, the module that defines its cases)
FAMILIES: Dict[str, Tuple[str, str]] = {
    "cache": ("cache", "cache"),
    "indexer": ("indexer", "indexer"),
    "topk": ("topk", "topk"),
    "attn-fwd": ("attn_fwd", "sparse_mla"),
    "attn-bwd": ("attn_bwd", "sparse_mla"),
    "decode": ("decode", "mla_decode"),
    "e2e": ("e2e", "e2e"),
    "train": ("train", "training"),
    "v4": ("v4", "v4"),
}


# ---------------------------------------------------------------- cases

def collect_cases(command: str, device: torch.device, quick: bool,
                  say=lambda msg: print(msg, file=sys.stderr)) -> Tuple[List[Case], List[dict], List[dict]]:
    """The cases of a subcommand: `(cases, error_rows, skipped_modules)`. A module that is absent
    is skipped; one whose import or `cases()` raises gives an error row."""
    wanted = [FAMILIES[command]] if command != "all" else list(FAMILIES.values())
    families = {fam for fam, _ in wanted}
    modules = list(dict.fromkeys(mod for _, mod in wanted))
    cases: List[Case] = []
    errors: List[dict] = []
    skipped: List[dict] = []

    def _report_failure(mod_name: str, exc: BaseException) -> None:
        reason = error_text(exc)
        errors.append(_error_row(mod_name, [fam for fam, mod in wanted if mod == mod_name], reason))
        say(f"dsa_ext.bench.{mod_name}: loading its cases failed: {reason}")

    for mod_name in modules:
        full = f"dsa_ext.bench.{mod_name}"
        try:
            module = importlib.import_module(full)
            if not hasattr(module, "cases"):
                raise ModuleNotFoundError(f"{full} defines no cases()", name=full)
            found = list(module.cases(device, quick))
        except ModuleNotFoundError as exc:
            if exc.name != full:   # the module is there but needs something missing
                _report_failure(mod_name, exc)
                continue
            skipped.append({"module": full, "reason": "not present (family not landed yet)"})
            say(f"skipping {full}: not present (family not landed yet)")
            continue
        except Exception as exc:  # a broken family must not stop the others
            _report_failure(mod_name, exc)
            continue
        cases.extend(c for c in found if c.family in families)
    return cases, errors, skipped


def _error_row(module: str, families: List[str], reason: str) -> dict:
    return {"family": "/".join(families), "name": f"{module}.cases", "shape": {}, "status": "error",
            "error": reason, "note": None, "ours_us": None, "reps": None, "graphed": False, "flops": 0.0,
            "bytes": 0.0, "bound": "memory", "flops_dtype": "bf16", "tflops": None, "gbs": None,
            "roofline_fraction": None, "baselines": {}}


# ---------------------------------------------------------------- report

def _git_commit() -> str:
    from .. import __version__ as version
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, "pyproject.toml")):   # installed, not a source tree
        return f"dsa_ext-{version}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"dsa_ext-{version}"


def build_report(rows: List[dict], skipped: List[dict], device: torch.device, roofline, settings: dict) -> dict:
    from .. import __version__ as version
    from dataclasses import asdict
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else roofline.name
    return {
        "schema": SCHEMA,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "dsa_ext_version": version,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "argv": list(sys.argv),
        "settings": settings,
        "device": {"type": device.type, "name": name, "roofline": asdict(roofline)},
        "skipped": skipped,
        "rows": rows,
    }


_ROW_TYPES = {
    "family": str, "name": str, "shape": dict, "status": str, "error": (str, type(None)),
    "note": (str, type(None)), "ours_us": (float, int, type(None)), "reps": (int, type(None)),
    "graphed": bool, "flops": (float, int), "bytes": (float, int), "bound": str, "flops_dtype": str,
    "tflops": (float, int, type(None)), "gbs": (float, int, type(None)),
    "roofline_fraction": (float, int, type(None)), "baselines": dict,
}


def validate_report(report: dict) -> None:
    """Raise ValueError unless `report` follows the "dsa-bench/1" schema (module docstring)."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"dsa-bench report: {what}")

    need(isinstance(report, dict) and report.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    for key, typ in (("timestamp", str), ("git_commit", str), ("dsa_ext_version", str), ("torch_version", str),
                     ("cuda_version", (str, type(None))), ("argv", list), ("settings", dict), ("device", dict),
                     ("skipped", list), ("rows", list)):
        need(isinstance(report.get(key), typ), f"{key} must be {typ}")
    dev = report["device"]
    need(dev.get("type") in ("cuda", "cpu") and isinstance(dev.get("name"), str), "device.type/name")
    roof = dev.get("roofline", {})
    for key in ("bf16_tflops", "fp8_tflops", "fp32_tflops", "bandwidth_gbs"):
        need(isinstance(roof.get(key), (int, float)) and roof[key] > 0, f"device.roofline.{key} must be > 0")
    for i, row in enumerate(report["rows"]):
        for key, typ in _ROW_TYPES.items():
            need(isinstance(row.get(key), typ), f"rows[{i}].{key} must be {typ}, got {row.get(key)!r}")
        need(row["status"] in ("ok", "error"), f"rows[{i}].status")
        need(row["bound"] in ("compute", "memory"), f"rows[{i}].bound")
        if row["status"] == "ok":
            need(row["ours_us"] is not None and row["ours_us"] > 0, f"rows[{i}].ours_us must be > 0")
        else:
            need(row["error"], f"rows[{i}] is an error row without an error message")
        for name, b in row["baselines"].items():
            need(isinstance(b, dict) and set(b) == {"us", "speedup", "error"}, f"rows[{i}].baselines[{name!r}]")


# ---------------------------------------------------------------- plot

def plot_e2e(rows: List[dict], path: str) -> str:
    """Time vs context length for DSA and dense (prefill and decode) from the e2e rows."""
    points = [r for r in rows if r["family"] == "e2e" and r["status"] == "ok"]
    if not points:
        return "--plot: no e2e rows to plot (run `dsa-bench e2e` or `dsa-bench all`)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib, or dsa_ext[plot]); no plot written"
    kinds = [k for k in ("dsa_prefill", "dsa_decode") if any(r["name"] == k for r in points)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sel = sorted((r for r in points if r["name"] == kind), key=lambda r: r["shape"]["L"])
        L = [r["shape"]["L"] for r in sel]
        ax.plot(L, [r["ours_us"] / 1e3 for r in sel], "o-", label="DSA (indexer + top-k + sparse MLA)")
        from .e2e import fastest_dense
        dense = [(r["shape"]["L"], (fastest_dense(r) or {}).get("us")) for r in sel]
        dense = [(x, y) for x, y in dense if y]
        if dense:
            ax.plot([x for x, _ in dense], [y / 1e3 for _, y in dense], "s--",
                    label="dense attention (faster of bf16 / fp32)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length L (tokens)")
        ax.set_ylabel("time per call (ms)")
        ax.set_title(kind.replace("dsa_", "").capitalize() + f" (K={sel[0]['shape'].get('K')}, H={sel[0]['shape'].get('H')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"--plot: wrote {path}"


# ---------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsa-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(FAMILIES) + ["all"], help="which family of cases to run")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (the CPU default)")
    p.add_argument("--graphs", action="store_true", help="time CUDA graph replays (CUDA only)")
    p.add_argument("--json", metavar="PATH", help=f"write a {SCHEMA} JSON report")
    p.add_argument("--plot", metavar="PATH", help="PNG of time vs context length, DSA vs dense (e2e rows)")
    p.add_argument("--filter", metavar="TEXT", help="only cases whose name contains TEXT")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--min-reps", type=int, default=None,
                   help="at least this many timed calls (default 3 on CUDA, 5 on CPU)")
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="aim for this much timed wall time per callable (default 0.5 on CUDA, 0.3 on CPU)")
    p.add_argument("--v32-heads", action="store_true",
                   help="e2e on the CPU at the DeepSeek-V3.2 layer sizes (128 heads, 64 indexer heads, "
                        "K=2048, L=2K and 4K): about ten minutes")
    p.add_argument("--sync", choices=["both", "mbarrier", "cluster"], default="both",
                   help="topk cases on a GPU: which cluster synchronisation of the top-k kernel "
                        "(DSA_TOPK_SYNC, set per call) is timed; both (default): the mbarrier kernel "
                        "as ours and the full-cluster-barrier kernel beside it as a baseline. "
                        "No effect on the CPU")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any case failed")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-demo"]:   # not a case family: the training demonstration
        from ..train_demo import main as train_demo
        return train_demo(argv[1:])
    args = parse_args(argv)
    import dsa_ext  # noqa: F401  (loads torch.ops.dsa)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("dsa-bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type == "cpu"
    # CPU calls are timed by the wall clock among other processes: more repetitions keep the
    # median clear of scheduler ticks.
    min_reps = args.min_reps if args.min_reps is not None else (3 if device.type == "cuda" else 5)
    opts = TimingOptions(warmup=args.warmup, min_reps=min_reps, max_reps=args.max_reps,
                         budget_s=args.budget if args.budget is not None else (0.5 if device.type == "cuda" else 0.3),
                         graphs=args.graphs and device.type == "cuda")
    if args.graphs and device.type != "cuda":
        print("dsa-bench: --graphs applies to CUDA only; timing eagerly", file=sys.stderr)

    roofline = detect_roofline(device)
    shapes = ("CPU: small quick shapes" if device.type == "cpu" else
              "small quick shapes (--quick)" if quick else "SPEC section 6 shapes")
    print(f"dsa-bench {args.command} on {device.type}: {roofline.describe()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, commit {_git_commit()}; {shapes}; "
          f"median of >= {opts.min_reps} reps after {opts.warmup} warm-up" + (", CUDA graphs" if opts.graphs else ""))

    if args.v32_heads:
        from . import e2e
        e2e.V32_HEADS = True
    from . import topk as topk_cases
    topk_cases.SYNC = args.sync
    cases, rows, skipped = collect_cases(args.command, device, quick)
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    total = len(cases)
    for index in range(1, total + 1):
        case = cases.pop(0)   # dropped once run, so a case's lazily built inputs are freed
        rows.append(run_case(case, device, roofline, opts))
        progress(index, total, rows[-1])
        del case

    print()
    print(format_table(rows) if rows else "no cases to run")
    if any(r["family"] == "e2e" for r in rows):
        from .e2e import summarize
        notes = {r["note"] for r in rows if r["family"] == "e2e" and r["note"]}
        for line in sorted(notes) + summarize(rows):
            print(line)
    for s in skipped:
        print(f"skipped {s['module']}: {s['reason']}")
    errors = sum(r["status"] == "error" for r in rows)
    if errors:
        print(f"{errors} case(s) failed (see ERROR rows)")

    if args.json:
        settings = {"family": args.command, "quick": quick, "graphs": opts.graphs, "warmup": opts.warmup,
                    "min_reps": opts.min_reps, "max_reps": opts.max_reps, "budget_s": opts.budget_s,
                    "topk_sync": args.sync}
        report = build_report(rows, skipped, device, roofline, settings)
        validate_report(report)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"--json: wrote {args.json}")
    if args.plot:
        print(plot_e2e(rows, args.plot))
    return 1 if args.strict and errors else 0


if __name__ == "__main__":
    sys.exit(main())
