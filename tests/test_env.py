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
    assert "wgmma" in h100["indexer"] and "fwd: warp-specialised wgmma (ws)" in h100["sparse_mla"]
    assert "warp-specialised wgmma (ws)" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_FWD": "ws"})["sparse_mla"]
    assert "2-CTA clusters" in h100["sparse_mla"]
    assert "unpaired" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_FWD": "ws"})["sparse_mla"]
    assert "2-CTA" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_FWD": "ws-pair"})["sparse_mla"]
    assert "bwd wgmma bf16 for H = 64 / 128" in h100["sparse_mla"]
    assert "bwd mma.sync" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_BWD": "mma"})["sparse_mla"]
    assert kernel_plan((9, 0), "9.0", env={"DSA_SPARSE_MLA_BWD": "wgmma"})["sparse_mla"].startswith("refused")
    # a 9.0 (no 'a') build on an H100 serves the default with mma.sync, without refusing
    assert kernel_plan((9, 0), "9.0", env={})["sparse_mla"].startswith("CUDA mma.sync")
    assert "overlap kernel" in h100["mla_decode"]
    assert "mma.sync" in kernel_plan((9, 0), "9.0a", env={"DSA_INDEXER_MMA": "sync"})["indexer"]
    assert "fwd: wgmma bf16" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_WGMMA": "1"})["sparse_mla"]
    assert "fwd: wgmma bf16" in kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_FWD": "wgmma"})["sparse_mla"]
    old = kernel_plan((9, 0), "9.0a", env={"DSA_SPARSE_MLA_FWD": "mma", "DSA_SPARSE_MLA_BWD": "mma",
                                           "DSA_MLA_DECODE_KERNEL": "mma",
                                           "DSA_SPARSE_MLA_DET_REDUCE": "bitmap"})
    assert old["sparse_mla"].startswith("CUDA mma.sync bf16 (90a)") and "bitmap" in old["sparse_mla"]
    assert old["mla_decode"] == "CUDA mma.sync bf16 (90a)"
    assert "wgmma bf16" in kernel_plan((9, 0), "9.0a", env={"DSA_MLA_DECODE_WGMMA": "1"})["mla_decode"]
    assert kernel_plan((9, 0), "9.0", env={"DSA_SPARSE_MLA_FWD": "ws"})["sparse_mla"].startswith("refused")
    # off Hopper the switches fall back (the launchers take mma.sync), they are not refused
    assert kernel_plan((8, 9), "8.9", env={"DSA_SPARSE_MLA_FWD": "ws"})["sparse_mla"].startswith("CUDA mma.sync")
    # the wgmma opt-ins need the sm_90a image: a 9.0 build refuses them instead of trapping
    assert kernel_plan((9, 0), "9.0", env={"DSA_MLA_DECODE_WGMMA": "1"})["mla_decode"].startswith("refused")
    a100 = kernel_plan((8, 0), "8.0;9.0a", env={})
    assert "mma.sync bf16 (80)" in a100["sparse_mla"]
    assert a100["indexer"].startswith("CUDA mma.sync bf16 after e4m3 -> bf16") and "MXFP4 keys: refused" in a100["indexer"]
    assert "one CTA per row" in a100["topk"]
    assert "mma.sync e4m3 (89)" in kernel_plan((8, 9), "8.0;8.9;9.0a", env={})["indexer"]
    # compute_80 PTX JIT on a newer GPU: no FP8 MMA and no clusters in that image
    b200_ptx80 = kernel_plan((10, 0), "8.0+PTX", env={})
    assert "bf16 after e4m3" in b200_ptx80["indexer"] and "(ptx80)" in b200_ptx80["indexer"]
    assert "no clusters" in b200_ptx80["topk"]
    assert all(v.startswith("none") for v in kernel_plan((8, 9), "9.0a", env={}).values())
    cpu = kernel_plan(None, env={"DSA_CPU_GEMM": "fp32"})
    assert "fp32 at::mm" in cpu["sparse_mla"] and cpu["cache"] == "CPU kernel"


# The release wheel's list (setup.py): which image and kernels each GPU generation gets.
WHEEL = "8.0;8.9;9.0a;10.0+PTX"


@pytest.mark.parametrize("cap,archs,env,image,indexer,topk", [
    ((8, 0), WHEEL, {}, "80", "mma.sync bf16 after e4m3", "one CTA per row"),          # A100
    ((8, 6), WHEEL, {}, "80", "mma.sync bf16 after e4m3", "one CTA per row"),          # A10 / 3090
    ((8, 9), WHEEL, {}, "89", "mma.sync e4m3 (89)", "one CTA per row"),                # L40S / 4090
    ((9, 0), WHEEL, {}, "90a", "wgmma e4m3", "clusters"),                              # H100 / H200
    ((9, 0), WHEEL, {"DSA_INDEXER_MMA": "sync"}, "90a", "mma.sync e4m3 (90a)", "clusters"),
    ((9, 0), WHEEL, {"DSA_INDEXER_MMA": "bf16"}, "90a", "mma.sync bf16 after e4m3", "clusters"),
    ((10, 0), WHEEL, {}, "100", "mma.sync e4m3 (100)", "clusters"),                    # B200: sm_100 cubin
    ((10, 3), WHEEL, {}, "100", "mma.sync e4m3 (100)", "clusters"),                    # B300
    ((12, 0), WHEEL, {}, "ptx100", "mma.sync e4m3 (ptx100)", "clusters"),              # RTX 5090: JIT
    ((10, 0), "9.0a+PTX", {}, "ptx90", "mma.sync e4m3 (ptx90)", "clusters"),           # B200, Hopper-only build
    ((9, 0), "8.0+PTX", {}, "ptx80", "mma.sync bf16 after e4m3", "no clusters"),       # H100 on compute_80 PTX
    ((9, 0), "9.0", {}, "90", "mma.sync e4m3 (90)", "clusters"),                       # 9.0 without the "a"
])
def test_kernel_plan_per_gpu(cap, archs, env, image, indexer, topk):
    assert loaded_image(cap, archs) == image
    plan = kernel_plan(cap, archs, env=env)
    assert indexer in plan["indexer"], plan["indexer"]
    assert topk in plan["topk"], plan["topk"]
    assert "wgmma" not in plan["indexer"] or image == "90a"   # wgmma is sm_90a-only


def test_python_m_dsa_ext_reports():
    r = subprocess.run([sys.executable, "-m", "dsa_ext"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for key in ("torch_running", "torch_built_against", "archs_compiled", "device", "kernels:",
                "sparse_mla", "ops:"):
        assert key in r.stdout
