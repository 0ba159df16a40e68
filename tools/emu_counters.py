"""Prints the CPU emulator's per-kernel counters: shared-memory wavefronts per request (1.0 =
no bank conflicts), global sectors per request (4 = a warp's coalesced 4-byte loads, 16 = 16-byte
loads), bytes moved, MMA / wgmma / ldmatrix instructions issued, barriers. Counts come from the
small shapes of the emulator tests, so compare ratios, not totals.

    python tools/emu_counters.py            # runs `pytest -m emu tests` first, then prints
    python tools/emu_counters.py --no-run   # prints build/emu/counters.json as it is
"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATH = ROOT / "build" / "emu" / "counters.json"


def main():
    if "--no-run" not in sys.argv:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "emu", str(ROOT / "tests")], env=env, check=False)
    data = json.loads(PATH.read_text())
    head = (f"{'family':<11} {'kernel':<60} {'launch':>6} {'ctas':>6} {'wf/req':>7} {'sec/req':>7} "
            f"{'MB read':>8} {'MB wrt':>7} {'cp.async MB':>11} {'mma':>8} {'wgmma':>6} {'ldsm':>7} {'bar':>6}")
    print(head)
    print("-" * len(head))
    for fam, kernels in data.items():
        for name, c in kernels.items():
            wf = c["smem_wavefronts"] / c["smem_requests"] if c["smem_requests"] else 0.0
            sec = c["gmem_sectors"] / c["gmem_requests"] if c["gmem_requests"] else 0.0
            short = name if len(name) <= 60 else name[:57] + "..."
            print(f"{fam:<11} {short:<60} {c['launches']:>6} {c['ctas']:>6} {wf:>7.2f} {sec:>7.2f} "
                  f"{c['gmem_bytes_read'] / 1e6:>8.3f} {c['gmem_bytes_written'] / 1e6:>7.3f} "
                  f"{c['cp_async_bytes'] / 1e6:>11.3f} {c['mma_sync']:>8} {c['wgmma']:>6} {c['ldmatrix']:>7} "
                  f"{c['barriers']:>6}")


if __name__ == "__main__":
    main()
