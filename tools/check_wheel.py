#!/usr/bin/env python3
"""Check a dsa_ext wheel's tags and metadata (CI runs this on the wheel auditwheel repaired).

  * the file name and the WHEEL file carry the same manylinux platform tag, and `auditwheel show`
    finds the symbol versions within it;
  * the only libraries between the wheel and that tag (auditwheel's libs_to_eliminate) are the
    ones it must not bundle: torch's (libtorch*, libc10*, and the libgomp torch ships in
    torch/lib), and CUDA's runtime (libcudart, loaded by torch from its nvidia-* wheels);
  * METADATA requires exactly the torch release recorded in dsa_ext/_build_info.py (the one the
    module was compiled against), and that record says what the wheel holds (CUDA or not, archs);
  * with --archs, the cubins / PTX in _C are exactly those of the arch list (cuobjdump).

  tools/check_wheel.py WHEEL [--archs "8.0;8.9;9.0a;10.0+PTX"] [--cuobjdump PATH]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

# What a dsa_ext wheel leaves to the environment instead of bundling (auditwheel --exclude).
EXCLUDED = [r"libtorch.*\.so", r"libc10.*\.so", r"libcudart\.so\.\d+", r"libgomp\.so\.1"]


def auditwheel_show(wheel):
    r = subprocess.run([sys.executable, "-m", "auditwheel", "show", "--json", wheel], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"auditwheel show failed:\n{r.stderr}")
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--archs", help="TORCH_CUDA_ARCH_LIST the wheel was built with, to check its images")
    ap.add_argument("--cuobjdump")
    args = ap.parse_args()
    errors = []
    name = os.path.basename(args.wheel)
    plat = name[:-4].split("-")[-1]
    if not re.fullmatch(r"manylinux_\d+_\d+_x86_64|manylinux\d+_x86_64", plat):
        errors.append(f"{name}: platform tag {plat!r} is not a manylinux tag (run auditwheel repair)")

    with zipfile.ZipFile(args.wheel) as z:
        names = z.namelist()
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        wheel_file = z.read(f"{dist}/WHEEL").decode()
        metadata = z.read(f"{dist}/METADATA").decode()
        info_src = z.read("dsa_ext/_build_info.py").decode() if "dsa_ext/_build_info.py" in names else None
        so = [n for n in names if re.fullmatch(r"dsa_ext/_C.*\.so", n)]
        tmp = tempfile.mkdtemp()
        if so:
            z.extract(so[0], tmp)
    tags = [l.split(": ", 1)[1] for l in wheel_file.splitlines() if l.startswith("Tag: ")]
    if not tags or any(t.split("-")[-1] != plat for t in tags):
        errors.append(f"WHEEL tags {tags} disagree with the file name's {plat}")
    if len(so) != 1:
        errors.append(f"expected one dsa_ext/_C*.so in the wheel, found {so}")

    show = auditwheel_show(args.wheel)
    print(f"auditwheel: symbol versions allow {show['sym_tag']}; external libraries "
          f"{sorted(show['external_libs'])}")
    upgrade = show["policy_upgrades"].get(plat)
    if upgrade is None and plat != show["overall_tag"]:
        errors.append(f"auditwheel lists no way to {plat} (symbol versions allow {show['sym_tag']})")
    for lib in (upgrade or {}).get("libs_to_eliminate", []):
        if not any(re.fullmatch(p, lib) for p in EXCLUDED):
            errors.append(f"{lib} stands between the wheel and {plat} and is not torch's or CUDA's: bundle it")

    record = {}
    if info_src is None:
        errors.append("dsa_ext/_build_info.py is missing from the wheel")
    else:
        exec(info_src, record)
        pin = f"torch=={record['TORCH_VERSION'].split('+')[0]}"
        reqs = [l.split(": ", 1)[1] for l in metadata.splitlines() if l.startswith("Requires-Dist: ")]
        torch_reqs = [r for r in reqs if re.match(r"torch\b", r) and "extra ==" not in r]
        if torch_reqs != [pin]:
            errors.append(f"METADATA requires {torch_reqs}, expected exactly [{pin!r}] "
                          f"(compiled against {record['TORCH_VERSION']})")
        print(f"compiled against torch {record['TORCH_VERSION']} (CUDA {record['TORCH_CUDA_VERSION'] or '-'}), "
              f"archs {record['CUDA_ARCHS'] or '-'}; METADATA: {torch_reqs}")
        if args.archs and record["CUDA_ARCHS"] != args.archs:
            errors.append(f"_build_info says archs {record['CUDA_ARCHS']!r}, expected {args.archs!r}")

    if args.archs and so:
        import importlib.util
        # dsa_ext/env.py by path: importing the package would load an extension.
        spec = importlib.util.spec_from_file_location(
            "dsa_env", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dsa_ext", "env.py"))
        env = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(env)
        cubins, ptx = env.parse_archs(args.archs)
        cuobjdump = args.cuobjdump or "cuobjdump"
        lib = os.path.join(tmp, so[0])
        elf = subprocess.run([cuobjdump, "--list-elf", lib], capture_output=True, text=True).stdout
        ptxs = subprocess.run([cuobjdump, "--list-ptx", lib], capture_output=True, text=True).stdout
        got_cubins = sorted(set(re.findall(r"\.sm_(\d+[af]?)\.cubin", elf)))
        got_ptx = sorted({int(re.sub(r"[af]$", "", p)) for p in re.findall(r"\.sm_(\d+[af]?)\.ptx", ptxs)})
        print(f"images in {os.path.basename(lib)}: cubins {got_cubins}, PTX {got_ptx}")
        if got_cubins != sorted(set(cubins)):
            errors.append(f"cubins {got_cubins}, expected {sorted(set(cubins))}")
        if got_ptx != sorted(set(ptx)):
            errors.append(f"PTX {got_ptx}, expected {sorted(set(ptx))}")

    for e in errors:
        print("FAIL:", e)
    if not errors:
        print(f"{name}: OK")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
