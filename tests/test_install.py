"""Every install gets the C++ CPU kernels or says why not (drmm_kernels/jit.py, setup.py; docs/kernels.md#installing).

The fast tests cover the first-use build's decisions without compiling: the switches, the missing-tool reasons and
warning, the per-flags build folder, the lock between processes. ``test_isolated_install_builds_on_first_use``
does what ``pip install git+...`` does (sdist, then a wheel in pip's isolated build env, which has no torch),
installs that wheel into a fresh venv sharing this torch, and checks that two processes importing it at once get
the ``cpu`` backend through one first-use build.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
import zipfile

import pytest

from drmm_kernels import jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DRMM_JIT", "DRMM_CPU_ARCH")}
    env.update(changes)
    return env


# --------------------------------------------------------------------------- decisions, no compiling


def test_jit_off_is_the_reason(monkeypatch):
    monkeypatch.setenv("DRMM_JIT", "0")
    assert not jit.enabled()
    with pytest.raises(jit.Unavailable, match="DRMM_JIT=0"):
        jit.load()


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("DRMM_JIT", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/drmm-test-cxx -O2")
    assert any("drmm-test-cxx" in m and "CXX" in m for m in jit.missing_tools())
    with pytest.raises(jit.Unavailable, match="no C\\+\\+ compiler: `/nonexistent/drmm-test-cxx` not found"):
        jit.load()


def test_missing_ninja_is_named(monkeypatch, tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++").split()[0])
    if cxx is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja binary on PATH ...
    monkeypatch.setitem(sys.modules, "ninja", None)  # ... and no pip `ninja` package to take it from
    missing = jit.missing_tools()
    assert [m for m in missing if "ninja" in m] == ["no `ninja` build tool (pip install ninja)"]
    assert not any("compiler" in m for m in missing)


def test_pip_ninja_is_used_without_an_activated_venv(monkeypatch, tmp_path):
    ninja = pytest.importorskip("ninja")
    if not os.path.isfile(os.path.join(ninja.BIN_DIR, "ninja")):
        pytest.skip("this ninja package has no BIN_DIR binary")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not any("ninja" in m for m in jit.missing_tools())
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_arch_defaults(monkeypatch):
    monkeypatch.delenv("DRMM_CPU_ARCH", raising=False)
    assert jit.default_arch(portable=False) == "native"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert jit.default_arch(portable=True) == jit.PORTABLE_ARCH == "x86-64-v3"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert jit.default_arch(portable=True) is None
    assert not any(f.startswith("-march") for f in jit.cxx_flags(None))
    monkeypatch.setenv("DRMM_CPU_ARCH", "skylake-avx512")
    assert jit.default_arch(portable=True) == jit.default_arch(portable=False) == "skylake-avx512"
    assert "-march=skylake-avx512" in jit.cxx_flags("skylake-avx512")
    monkeypatch.setenv("DRMM_CPU_ARCH", "none")
    assert jit.default_arch(portable=False) is None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable -march is x86-64's")
def test_setup_py_arch_per_command():
    # A wheel may be installed on another machine (portable); an editable build runs where it was compiled.
    for command, arch in (("bdist_wheel", jit.PORTABLE_ARCH), ("editable_wheel", "native")):
        out = subprocess.run(
            [sys.executable, "setup.py", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=_env(DRMM_SKIP_CUDA_BUILD="1"),
        )
        assert out.returncode == 0 and f"-march={arch})" in out.stdout, (
            command,
            out.stdout[-2000:],
            out.stderr[-2000:],
        )


def test_checkout_sources_are_complete():
    # What setup.py copies into the package (schema.cpp + CPU_SOURCE_DIRS) must be all that the CPU build
    # compiles and includes, or an installed first-use build would miss a header.
    root = jit.source_root()
    assert root is not None and os.path.samefile(root, os.path.join(ROOT, "csrc"))
    sources = jit.cpu_sources(root)
    assert sources[0].endswith("schema.cpp")
    assert sorted(sources[1:]) == sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    pending = list(sources)
    seen = set()
    while pending:
        path = pending.pop()
        with open(path) as f:
            for line in f:
                if line.startswith('#include "'):
                    rel = line.split('"')[1]
                    assert rel.split("/")[0] in jit.CPU_SOURCE_DIRS, f"{path} includes {rel}"
                    if rel not in seen:
                        seen.add(rel)
                        pending.append(os.path.join(root, rel))


def test_build_folder_follows_the_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    sources = jit.cpu_sources(jit.source_root())
    native = jit.build_directory(sources, jit.cxx_flags("native"))
    assert native == jit.build_directory(sources, jit.cxx_flags("native"))
    assert native != jit.build_directory(sources, jit.cxx_flags("x86-64-v3"))
    assert os.path.dirname(native) == str(tmp_path)


def test_warning_once_with_the_fix(monkeypatch):
    monkeypatch.delenv("DRMM_JIT", raising=False)
    monkeypatch.setattr(jit, "_warned", False)
    with pytest.warns(RuntimeWarning, match="reference backend: no C\\+\\+ compiler here.*DRMM_JIT=0 silences"):
        jit.warn_once("no C++ compiler here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jit.warn_once("no C++ compiler here")  # a second time: silent
        monkeypatch.setattr(jit, "_warned", False)
        monkeypatch.setenv("DRMM_JIT", "0")
        jit.warn_once("turned off")  # DRMM_JIT=0 is a choice, not a problem


def test_concurrent_first_uses_wait_for_one_build(tmp_path):
    # A second process reaching the build while another holds the folder's lock says so and waits; the lock is
    # the kernel's (flock), so a killed builder cannot leave it held. jit.py imports no torch: cheap to spawn.
    if sys.platform == "win32":
        pytest.skip("flock is POSIX")
    (tmp_path / "lock").write_text("")  # what an older torch's killed build leaves behind
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("jit", {jit.__file__!r})
        jit = importlib.util.module_from_spec(spec); spec.loader.exec_module(jit)
        with jit._exclusive({str(tmp_path)!r}):
            print("entered", flush=True)
    """)
    with jit._exclusive(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()  # still waiting for us
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "entered", err
    assert "waiting for another process building the C++ CPU kernels" in err


_BLOCK_C = textwrap.dedent("""
    import importlib.abc, sys, warnings
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == 'drmm_kernels._C': raise ImportError('no compiled extension in this test')
    sys.meta_path.insert(0, Block())
    warnings.simplefilter('always')
    import torch, drmm_kernels as dk
""")


def test_without_extension_jit_off_is_reported():
    code = _BLOCK_C + textwrap.dedent("""
        with warnings.catch_warnings(record=True) as caught:
            st = dk.available_backends()['cpu']
        assert not st.available and 'no compiled extension in this test' in st.reason, st
        assert 'DRMM_JIT=0' in st.reason, st
        assert not [w for w in caught if 'C++ CPU kernels' in str(w.message)], caught
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(DRMM_JIT="0"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_without_extension_and_compiler_warns_once_and_falls_back():
    code = _BLOCK_C + textwrap.dedent("""
        with warnings.catch_warnings(record=True) as caught:
            st = dk.available_backends()['cpu']
            y, sw = dk.conv_relu_pool(torch.randn(1, 1, 4, 4), torch.ones(1, 1, 1, 1))
            dk.available_backends()
        assert not st.available and '`/nonexistent/drmm-test-cxx` not found' in st.reason, st
        ours = [str(w.message) for w in caught if 'C++ CPU kernels' in str(w.message)]
        assert len(ours) == 1 and 'drmm-test-cxx' in ours[0] and 'reference backend' in ours[0], ours
        assert y.shape == (1, 1, 2, 2)
        print('ok')
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(CXX="/nonexistent/drmm-test-cxx")
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------------------------------- the real thing

_FIRST_USE = textwrap.dedent("""
    import os, sys, torch
    import drmm_kernels as dk
    venv, ext = sys.argv[1], sys.argv[2]
    assert os.path.realpath(dk.__file__).startswith(os.path.realpath(venv)), dk.__file__
    st = dk.available_backends()['cpu']
    assert st.available, st.reason
    lib = sys.modules['drmm_kernels._C'].__file__
    assert os.path.realpath(lib).startswith(os.path.realpath(ext)), lib
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 9, 9, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    got = {}
    for name in ('cpu', 'reference'):
        with dk.backend(name):
            y, sw = dk.conv_relu_pool(x, w, padding=1)
            got[name] = (y, sw, dk.render(y, sw, w, padding=1, out_size=(9, 9)))
    for a, b in zip(got['cpu'], got['reference']):
        torch.testing.assert_close(a, b)
    print('ok', lib)
""")


@pytest.mark.slow
def test_isolated_install_builds_on_first_use(tmp_path):
    start = time.monotonic()
    src, dist, venv, ext = (tmp_path / d for d in ("src", "dist", "venv", "ext"))
    # The files an sdist is made from (a copy: building writes egg-info next to setup.py).
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(os.path.join(ROOT, name), src)
    for name in ("csrc", "drmm", "drmm_kernels"):
        shutil.copytree(
            os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "_csrc")
        )
    # 1. sdist (no torch needed to make one); it must carry the C++ sources.
    out = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
        cwd=src,
        capture_output=True,
        text=True,
        env=_env(DRMM_NO_EXTENSION="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("/csrc/schema.cpp") for n in names) and any(n.endswith("/csrc/cpu/simd.h") for n in names)
    # 2. The wheel, as `pip install <sdist or git url>` makes it: in an isolated build env (setuptools from the
    # package registry, no torch), so without drmm_kernels._C.
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(dist), sdist],
        capture_output=True,
        text=True,
        env=_env(),
    )
    if out.returncode != 0 and "No matching distribution found for setuptools" in out.stdout + out.stderr:
        pytest.skip("no package registry for pip's isolated build environment")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (wheel,) = glob.glob(str(dist / "*.whl"))
    assert wheel.endswith("-py3-none-any.whl"), wheel  # pure Python: torch was absent at build time
    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
    assert not any(f.endswith((".so", ".pyd")) for f in files)
    shipped = {f.split("drmm_kernels/_csrc/", 1)[1] for f in files if f.startswith("drmm_kernels/_csrc/")}
    assert {os.path.relpath(p, jit.source_root()) for p in jit.cpu_sources(jit.source_root())} <= shipped
    # 3. A fresh venv that shares this torch (and ninja) through a .pth line, the wheel installed into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    site = subprocess.run(
        [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import torch

    with open(os.path.join(site, "shared_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    out = subprocess.run(
        [vpy, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--target", site, wheel],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    installed = time.monotonic()
    # 4. Two processes use it at once: one builds (x86-64-v3, the wheels' portable target: this also checks that
    # the kernels are right without AVX-512), the other waits and loads the same library; one message in all.
    env = _env(
        TORCH_EXTENSIONS_DIR=str(ext), DRMM_CPU_ARCH=jit.PORTABLE_ARCH if platform.machine() == "x86_64" else "none"
    )
    procs = [
        subprocess.Popen(
            [vpy, "-c", _FIRST_USE, str(venv), str(ext)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out_, err) in zip(procs, results):
        assert p.returncode == 0 and out_.startswith("ok"), err[-3000:]
    assert sum(err.count(jit.MESSAGE) for _, err in results) == 1, [err[-2000:] for _, err in results]
    (lib,) = {out_.split()[1] for out_, _ in results}
    if platform.machine() == "x86_64" and shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True).stdout
        assert "ymm" in asm and "zmm" not in asm, "the x86-64-v3 build must use AVX2 and no AVX-512"
    print(
        f"isolated install: {installed - start:.0f} s; first use (build + check, two processes): "
        f"{time.monotonic() - installed:.0f} s"
    )
