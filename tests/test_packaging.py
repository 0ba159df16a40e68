"""What the release artefacts carry (issue 15): the sdist holds everything a wheel build from it
needs (tools/build_wheel.sh builds the wheel from the sdist, not from this tree) and none of an
in-place build's outputs; the wheel gets every Python package. The import-time torch check is
tested in tests/test_build.py; the wheel itself (tag, bundled libraries, pin, images) is checked
by tools/check_wheel.py in .ci/run's wheel stage."""
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked(*dirs):
    """Files under `dirs` that git tracks (the sources of a clone), else every file there."""
    if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")):
        r = subprocess.run(["git", "-C", ROOT, "ls-files", "--", *dirs], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return sorted(l for l in r.stdout.splitlines() if os.path.exists(os.path.join(ROOT, l)))
    out = []
    for d in dirs:
        for base, subdirs, files in os.walk(os.path.join(ROOT, d)):
            subdirs[:] = [s for s in subdirs if s != "__pycache__"]
            out += [os.path.relpath(os.path.join(base, f), ROOT) for f in files
                    if not f.endswith((".so", ".o", ".pyc")) and f != "_build_info.py"]
    return sorted(out)


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    # From outside the tree, as tools/build_wheel.sh (the CMake build/ folder there is no
    # stand-in for the package `build`). cmake / ninja are looked up by setup.py.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(out), ROOT],
                       cwd=out, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = [p for p in os.listdir(out) if p.endswith(".tar.gz")]
    with tarfile.open(out / sdist) as t:
        names = t.getnames()
    prefix = names[0].split("/")[0] + "/"
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def test_sdist_has_what_the_build_needs(sdist_names):
    for f in ("PKG-INFO", "setup.py", "pyproject.toml", "CMakeLists.txt", "MANIFEST.in", "README.md",
              "requirements.txt", "requirements-test.txt"):
        assert f in sdist_names, f
    # every source the CMake build compiles or includes, the Python package, and the tools
    missing = [f for f in _tracked("csrc", "dsa_ext", "tools", "tests") if f not in sdist_names]
    assert not missing, f"tracked files missing from the sdist (MANIFEST.in): {missing[:20]}"
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    for fam in re.search(r"set\(DSA_FAMILIES ([^)]*)\)", cmake).group(1).split():
        for kind in ("cpu.cpp", "cuda.cpp", "launch.cu"):
            assert f"csrc/{fam}/{fam}_{kind}" in sdist_names


def test_sdist_has_no_build_outputs(sdist_names):
    bad = [n for n in sdist_names if n.endswith((".so", ".o", ".pyc")) or "__pycache__" in n
           or n == "dsa_ext/_build_info.py" or n.startswith(("build/", ".venv/", "bench/results/", "dist/"))]
    assert not bad, bad


def test_every_python_package_is_listed():
    """pyproject.toml lists the packages by hand: a new subpackage missing there would be in the
    sdist (MANIFEST) but not in the wheel, and `import dsa_ext` from a wheel would fail."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    listed = set(re.findall(r'"(dsa_ext[\w.]*)"', re.search(r"packages\s*=\s*\[([^\]]*)\]", text).group(1)))
    found = {os.path.relpath(base, ROOT).replace(os.sep, ".")
             for base, _, files in os.walk(os.path.join(ROOT, "dsa_ext")) if "__init__.py" in files}
    assert found == listed, f"pyproject.toml packages {sorted(listed)} vs on disk {sorted(found)}"


def test_build_wheel_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "tools", "build_wheel.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_check_wheel_excludes_what_build_wheel_excludes():
    """tools/check_wheel.py accepts as unbundled exactly the libraries build_wheel.sh excludes."""
    import fnmatch
    script = open(os.path.join(ROOT, "tools", "build_wheel.sh")).read()
    globs = re.findall(r"--exclude '([^']+)'", script)
    src = open(os.path.join(ROOT, "tools", "check_wheel.py")).read()
    ns = {}
    exec(re.search(r"^EXCLUDED = .*$", src, re.M).group(0), {"re": re}, ns)
    for lib in ("libtorch_cpu.so", "libtorch_cuda.so", "libc10.so", "libc10_cuda.so", "libcudart.so.13",
                "libgomp.so.1"):
        assert any(fnmatch.fnmatch(lib, g) for g in globs), lib
        assert any(re.fullmatch(p, lib) for p in ns["EXCLUDED"]), lib
    for lib in ("libstdc++.so.6", "libnuma.so.1"):
        assert not any(fnmatch.fnmatch(lib, g) for g in globs)
        assert not any(re.fullmatch(p, lib) for p in ns["EXCLUDED"])


def test_readme_gpu_table_is_kernel_plan():
    """README's 'Supported GPUs' table says what dsa_ext.env.kernel_plan says for the release list."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("dsa_env_for_readme", os.path.join(ROOT, "dsa_ext", "env.py"))
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    wheel = "8.0;8.9;9.0a;10.0+PTX"
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("### Supported GPUs (release wheel)", 1)[1].split("\n\n| GPU |", 1)[1].split("\n\n")[0]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in ("| GPU |" + table).splitlines()[2:]]
    caps = {"A100": [(8, 0)], "A10": [(8, 6)], "L40S": [(8, 9)], "H100": [(9, 0)], "B200": [(10, 0), (10, 3)],
            "newer": [(12, 0)]}
    seen = set()
    for gpu, image, indexer, topk, mla, decode, simt in rows:
        key = next(k for k in caps if gpu.startswith(k))
        seen.add(key)
        for cap in caps[key]:
            plan, got = env.kernel_plan(cap, wheel, env={}), env.loaded_image(cap, wheel)
            want = re.search(r"compute_(\d+) PTX", image)
            assert got == (f"ptx{want.group(1)}" if want else re.search(r"sm_(\w+) cubin", image).group(1)), (gpu, got)
            if indexer == "as A100":
                assert plan == env.kernel_plan((8, 0), wheel, env={}), gpu
                continue
            assert ("wgmma" in indexer) == ("wgmma" in plan["indexer"]), gpu
            assert ("refused" in indexer) == ("refused" in plan["indexer"]), gpu
            assert ("bf16 in shared memory" in indexer) == ("bf16 in shared memory" in plan["indexer"]), gpu
            assert ("clusters of up to 16" in topk) == ("clusters of up to 16" in plan["topk"]), gpu
            assert ("one CTA per row" in topk) == ("one CTA per row" in plan["topk"]), gpu
            assert ("warp-specialised" in mla) == ("warp-specialised" in plan["sparse_mla"]), gpu
            assert ("wgmma` bwd" in mla) == ("bwd wgmma" in plan["sparse_mla"]), gpu
            assert ("overlap kernel" in decode) == ("overlap kernel" in plan["mla_decode"]), gpu
            assert simt == "SIMT" and all(plan[f].startswith("CUDA SIMT") for f in ("cache", "hadamard", "training", "compress"))
    assert seen == set(caps)
    assert env.loaded_image((7, 0), wheel) is None   # V100: no image, as the README says


def test_release_arch_list_configures(tmp_path):
    """CMake splits a compile definition at ';': the release list "8.0;8.9;9.0a;10.0+PTX" once
    became -D8.9 -D9.0a ... and the wheel build failed at the first C++ file. Configure only
    (no compile): the definition is one string, and _build_info.py records the list as given."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not (shutil.which("cmake") and shutil.which("ninja") and os.access(nvcc, os.X_OK)):
        pytest.skip("needs cmake, ninja and nvcc")
    import torch
    if not torch.version.cuda:
        pytest.skip("a CPU-only torch configures without CUDA")
    archs = "8.0;8.9;9.0a;10.0+PTX"
    env = {**os.environ, "CUDACXX": nvcc, "CUDA_HOME": os.path.dirname(os.path.dirname(nvcc)),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "b"), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
                        f"-DDSA_OUTPUT_DIR={tmp_path / 'out'}", "-DDSA_WITH_CUDA=ON", f"-DTORCH_CUDA_ARCH_LIST={archs}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ninja = (tmp_path / "b" / "build.ninja").read_text()
    defines = [l for l in ninja.splitlines() if l.strip().startswith("DEFINES") and "DSA_CUDA_ARCHS" in l]
    assert defines
    for l in defines:
        assert '-DDSA_CUDA_ARCHS="\\"8.0 8.9 9.0a 10.0+PTX\\""' in l, l
        assert " -D8.9 " not in l and "-D10.0+PTX" not in l, l
    ns = {}
    exec((tmp_path / "out" / "_build_info.py").read_text(), ns)
    assert ns["CUDA_ARCHS"] == archs
