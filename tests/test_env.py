"""dsa_ext.env: the image the driver loads and the kernel each op family runs, for faked device
capabilities (no GPU needed), and the `python -m dsa_ext` report itself."""
import subprocess
import sys

import pytest

from dsa_ext.env import kernel_plan, loaded_image, parse_archs


@pytest.mark.parametrize("cap,archs,image", [
    ((9, 0), "9.0a", "90a"),
    ((9, 0), "8.0;9.0a", "90a"),
    ((9, 0), "8.0;9.0", "90"),            # sm_90 cubin: no wgmma features
    ((8, 9), "9.0a", None),               # L40S / 4090 with a Hopper-only build
    ((8, 9), "8.0;8.9;9.0a", "89"),
    ((8, 6), "8.0;9.0a", "80"),           # same major, older minor cubin loads
    ((10, 0), "8.0;9.0a", None),          # B200 without sm_100 or PTX
    ((10, 0), "8.0+PTX;9.0a", "ptx80"),   # JIT from compute_80 PTX
    ((12, 0), "8.0;10.0", None),
    ((10, 3), "10.0;10.0a", "100"),       # 10.0a only on exactly 10.0
])
def test_loaded_image(cap, archs, image):
    assert loaded_image(cap, archs) == image


def test_parse_archs():
    assert parse_archs("8.0 8.6+PTX;9.0a") == (["80", "86", "90a"], [86])


def test_kernel_plan_rules():
    h100 = kernel_plan((9, 0), "9.0a", env={})
    assert "wgmma" in h100["indexer"] and "mma.sync" in h100["sparse_mla"]
    assert "mma.sync" in kernel_plan((9, 0), "9.0a", env={"DSA_INDEXER_MMA": "sync"})["indexer"]
    assert "opt-in" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_WGMMA": "1"})["sparse_mla"]
    # the wgmma opt-ins need the sm_90a image: a 9.0 build refuses them instead of trapping
    assert kernel_plan((9, 0), "9.0", env={"DSA_MLA_DECODE_WGMMA": "1"})["mla_decode"].startswith("refused")
    a100 = kernel_plan((8, 0), "8.0;9.0a", env={})
    assert a100["indexer"].startswith("refused") and "mma.sync bf16 (80)" in a100["sparse_mla"]
    assert "mma.sync e4m3 (89)" in kernel_plan((8, 9), "8.0;8.9;9.0a", env={})["indexer"]
    # compute_80 PTX JIT on a newer GPU: no FP8 MMA in that image
    assert kernel_plan((10, 0), "8.0+PTX", env={})["indexer"].startswith("refused")
    assert all(v.startswith("none") for v in kernel_plan((8, 9), "9.0a", env={}).values())
    cpu = kernel_plan(None, env={"DSA_CPU_GEMM": "fp32"})
    assert "fp32 at::mm" in cpu["sparse_mla"] and cpu["cache"] == "CPU kernel"


def test_python_m_dsa_ext_reports():
    r = subprocess.run([sys.executable, "-m", "dsa_ext"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for key in ("torch_running", "torch_built_against", "archs_compiled", "device", "kernels:",
                "sparse_mla", "ops:"):
        assert key in r.stdout
