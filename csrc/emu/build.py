"""Builds the CPU emulator for one op family: build/emu/libdsa_emu_FAMILY.so.

    python csrc/emu/build.py FAMILY [--force]    # prints the library's path

The runtime (runtime.cpp) and the PTX semantics (ptx.cpp) are compiled plainly; the family's
entry points (families/FAMILY_emu.cpp, which includes the kernels and the rewritten launcher)
are compiled with -fsanitize=thread so that every load and store calls the runtime's hooks,
and linked without the TSan runtime (the hooks are ours). The emulated device is an sm_90a
(__CUDA_ARCH__ 900 with the arch-specific features). Rebuilt when any source under csrc/
changes (hash of the sources and flags).
"""
import hashlib
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
OUT = pathlib.Path(os.environ.get("DSA_EMU_BUILD_DIR", ROOT / "build" / "emu"))
CXX = os.environ.get("CXX", "g++")
COMMON = ["-std=c++20", "-g", "-fPIC", "-fno-omit-frame-pointer", "-Wno-unknown-pragmas",
          "-DDSA_EMULATOR", "-D__CUDA_ARCH__=900", "-D__CUDA_ARCH_FEAT_SM90_ALL",
          f"-I{EMU / 'shim'}", f"-I{CSRC}", f"-I{OUT / 'gen'}"]
OPT = os.environ.get("DSA_EMU_OPT", "-O1")
# -fsanitize=thread only instruments; without -fsanitize at link time no runtime is pulled in.
INSTRUMENT = ["-fsanitize=thread"]


def sources_hash(family: str) -> str:
    h = hashlib.sha256(" ".join(COMMON + [OPT, CXX]).encode())
    for p in sorted(CSRC.rglob("*")):
        if p.suffix in (".h", ".cuh", ".cu", ".cpp", ".py") and p.is_file():
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    h.update(family.encode())
    return h.hexdigest()[:16]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(" ".join(map(str, cmd)) + "\n" + r.stdout + r.stderr)
        raise SystemExit(f"emulator build failed: {cmd[-1]}")


def build(family: str, force: bool = False) -> pathlib.Path:
    sys.path.insert(0, str(EMU))
    from launch_rewrite import rewrite  # noqa: E402

    lib = OUT / f"libdsa_emu_{family}.so"
    stamp = OUT / f"libdsa_emu_{family}.hash"
    digest = sources_hash(family)
    if not force and lib.exists() and stamp.exists() and stamp.read_text() == digest:
        return lib
    (OUT / "gen").mkdir(parents=True, exist_ok=True)
    for launcher in CSRC.glob("*/*_launch.cu"):
        gen = OUT / "gen" / (launcher.stem + ".gen.cu")
        text = f'#line 1 "{launcher}"\n' + rewrite(launcher.read_text())
        if not gen.exists() or gen.read_text() != text:
            gen.write_text(text)
    objs = []
    for src, extra in ((EMU / "runtime.cpp", []), (EMU / "ptx.cpp", []),
                       (EMU / "families" / f"{family}_emu.cpp", INSTRUMENT)):
        if not src.exists():
            if src.name == "ptx.cpp":
                continue
            raise SystemExit(f"no such emulator source: {src}")
        obj = OUT / f"{family}.{src.stem}.o"
        if extra:  # the family TU may launch with <<<>>> itself
            gen = OUT / "gen" / (src.stem + ".gen.cpp")
            gen.write_text(f'#line 1 "{src}"\n' + rewrite(src.read_text()))
            src = gen
        run([CXX, *COMMON, OPT, *extra, "-c", "-x", "c++", str(src), "-o", str(obj)])
        objs.append(str(obj))
    run([CXX, "-shared", "-Wl,--no-undefined", *objs, "-o", str(lib), "-ldl", "-lpthread"])
    stamp.write_text(digest)
    return lib


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        raise SystemExit(__doc__)
    print(build(args[0], force="--force" in sys.argv))
