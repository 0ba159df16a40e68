#!/usr/bin/env python3
"""No kernel that dispatch can reach is a trap, for every arch a TORCH_CUDA_ARCH_LIST may name.

Some kernels compile to __trap() where the image lacks a feature: wgmma without sm_90a, e4m3
mma.sync below sm_89. Dispatch may only reach them after asking which image the driver loaded
(require_loaded_image, csrc/common/loaded_image.cuh), because the device's compute capability
cannot tell (an sm_90 cubin runs on an H100 as well as an sm_90a one does). This compiles every
launcher with the flags CMake passes, for sm_80, sm_89, sm_90, sm_90a and sm_100 (the release
wheel's list "8.0;8.9;9.0a;10.0+PTX" plus the sm_90 a "9.0" build makes), and checks each cubin:

  * the image probe's __launch_bounds__ is the level that cubin's arch can execute (so the
    runtime answer of require_loaded_image is right), and
  * every kernel with a trap (BPT.TRAP in its SASS) is one that a require_loaded_image guard
    (GUARDS below, mirroring the launchers) keeps from running at that cubin's level.

Each -gencode is compiled on its own, so a cubin does not depend on what else the list holds:
checking sm_80, sm_90 and sm_90a once covers "9.0", "8.0;9.0", "9.0a", "8.0;9.0a", "9.0;9.0a"
(whichever of the two images an H100 loads from the last one, the probe reports it). PTX that
the driver JIT-compiles for a newer device is code of its compute capability, the same as its
cubin here (compute_100 PTX on an sm_120 GPU: the sm_100 row). sm_89 and sm_100 run the sm_80-class
kernels plus the e4m3 mma.sync ones; wgmma stays behind the sm_90a guard there.

  tools/check_loaded_image.py [--cuobjdump PATH] [--archs sm_80,sm_90a] [file.cu ...]
      (default: all of ARCHS, csrc/*/*_launch.cu)
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.environ.get("NVCC", os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
# CMakeLists.txt's dsa_kernels options for CMAKE_BUILD_TYPE Release (-O3 -DNDEBUG).
CMAKE_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-fPIC"]

# The ImageLevel (loaded_image.cuh) each arch's cubin can execute.
BASIC, FP8_MMA, SM90A = 1, 2, 3
ARCHS = {"sm_80": BASIC, "sm_89": FP8_MMA, "sm_90": FP8_MMA, "sm_90a": SM90A, "sm_100": FP8_MMA}
PROBE_THREADS_PER_LEVEL = 32

# launcher -> (demangled kernel-name regex, level its dispatch requires via require_loaded_image).
GUARDS = {
    "sparse_mla_launch": [(r"sparse_mla_(fwd_wgmma|fwd_ws|bwd_wgmma)_kernel<(576|512)(, (true|false))?>\(", SM90A)],  # fwd_ / bwd_kernel_selected
    "mla_decode_launch": [(r"sparse_mla_decode_kernel<64, dsa::mla_decode::Fmt<[^>]*>, true>", SM90A),  # same
                          (r"sparse_mla_decode_overlap_kernel<(true|false)>", SM90A)],  # overlap_selected
    # dispatch_heads: the e4m3 kernels (last template argument kBf16Mma = false) need an FP8
    # MMA image; the bf16 kernels (true) serve every image and must have no trap. Without the
    # kBf16Mma argument (<kHeads, kPaged, kAllowWgmma, kMx>) every instantiation is e4m3.
    "indexer_launch": [(r"indexer_logits_kernel<\d+, \w+, \w+, \w+(, false)?>", FP8_MMA)],
}


def find_cuobjdump(given):
    for c in [given, shutil.which("cuobjdump"), os.path.join(os.path.dirname(NVCC), "cuobjdump")]:
        if c and os.access(c, os.X_OK):
            return c
    try:
        import triton
        c = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        if os.access(c, os.X_OK):
            return c
    except ImportError:
        pass
    sys.exit("cuobjdump not found")


def compile_object(src, out_dir, archs):
    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    r = subprocess.run([NVCC, *gencode, *CMAKE_FLAGS, "-I" + os.path.join(ROOT, "csrc"), "-c", src, "-o", obj],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{src}: nvcc failed\n{r.stderr}")
    return obj


def demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, r.stdout.splitlines()))


def sass_kernels(cuobjdump, obj):
    """{arch: {mangled kernel: has_trap}} from the SASS of every cubin in obj."""
    out, arch, fn = {}, None, None
    proc = subprocess.Popen([cuobjdump, "--dump-sass", obj], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("arch = "):
            arch = line.split()[2]
            out.setdefault(arch, {})
        elif "Function : " in line:
            fn = line.split("Function : ")[1].strip()
            out[arch][fn] = False
        elif "BPT.TRAP" in line:
            out[arch][fn] = True
    if proc.wait() != 0:
        raise RuntimeError(f"cuobjdump --dump-sass {obj} failed")
    return out


def probe_levels(cuobjdump, obj):
    """{arch: level} from EIATTR_MAX_THREADS of dsa_image_probe_kernel's .nv.info section."""
    r = subprocess.run([cuobjdump, "--dump-elf", obj], capture_output=True, text=True, check=True)
    levels, arch, in_probe, attr = {}, None, False, None
    for line in r.stdout.splitlines():
        if line.startswith("arch = "):
            arch = line.split()[2]
        elif line.startswith(".nv.info."):
            in_probe = "dsa_image_probe_kernel" in line
        elif in_probe and "Attribute:" in line:
            attr = line.split()[-1]
        elif in_probe and attr == "EIATTR_MAX_THREADS" and line.strip().startswith("Value:"):
            levels[arch] = int(line.split()[1], 16) // PROBE_THREADS_PER_LEVEL
            in_probe = False
    return levels


def check(cuobjdump, obj, launcher, archs):
    errors = []
    kernels = sass_kernels(cuobjdump, obj)
    levels = probe_levels(cuobjdump, obj)
    guards = GUARDS.get(launcher, [])
    names = demangle(sorted({k for per in kernels.values() for k in per}))
    for arch in archs:
        level = ARCHS[arch]
        if arch not in kernels:
            errors.append(f"{launcher}: no {arch} cubin")
            continue
        if guards and levels.get(arch) != level:
            errors.append(f"{launcher} {arch}: image probe reports level {levels.get(arch)}, expected {level}")
        for pattern, _ in guards:
            if not any(re.search(pattern, names[k]) for k in kernels[arch]):
                errors.append(f"{launcher} {arch}: guard pattern {pattern!r} matches no kernel (stale GUARDS?)")
        unreachable = 0
        for k, has_trap in kernels[arch].items():
            if not has_trap:
                continue
            needed = max([lv for p, lv in guards if re.search(p, names[k])], default=0)
            if needed > level:
                unreachable += 1
            else:
                errors.append(f"{launcher} {arch}: {names[k]} has a trap that dispatch can reach")
        print(f"  {launcher:18s} {arch:7s} probe level {levels.get(arch, '-')}, "
              f"{len(kernels[arch])} kernels, {unreachable} with a trap behind a guard")
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuobjdump")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        sys.exit(f"unknown arch {unknown}: expected some of {', '.join(ARCHS)}")
    cuobjdump = find_cuobjdump(args.cuobjdump)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc/*/*_launch.cu")))
    # The largest first, so that two workers finish together.
    files.sort(key=os.path.getsize, reverse=True)
    errors = []
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        jobs = {pool.submit(compile_object, f, tmp, archs): f for f in files}
        for job in concurrent.futures.as_completed(jobs):
            launcher = os.path.basename(jobs[job])[:-3]
            errors += check(cuobjdump, job.result(), launcher, archs)
    for e in errors:
        print("FAIL:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
