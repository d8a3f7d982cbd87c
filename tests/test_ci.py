"""The build and test set-up itself: CI goes red without the native kernels, and the declared
dependencies are exactly what the code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALLOW_NO_NATIVE, native_required

ROOT = Path(__file__).resolve().parent.parent
X86_64_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
only_x86_64_linux = pytest.mark.skipif(not X86_64_LINUX, reason="the kernels are required on x86-64 Linux only")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BITLM_BACKEND", ALLOW_NO_NATIVE, "BITLM_KERNELS_LIB")}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# the native library is required where it must build
# ---------------------------------------------------------------------------------------------


def test_native_required_rule():
    linux, x86 = "linux", "x86_64"
    assert native_required({}, linux, x86)
    assert native_required({}, linux, "AMD64")
    assert native_required({ALLOW_NO_NATIVE: "0"}, linux, x86)  # "0" is not an opt-out
    assert not native_required({ALLOW_NO_NATIVE: "1"}, linux, x86)
    assert not native_required({}, linux, "aarch64")
    assert not native_required({}, "darwin", x86)
    # BITLM_BACKEND=native asks for the library everywhere, opt-out or not
    assert native_required({"BITLM_BACKEND": "native", ALLOW_NO_NATIVE: "1"}, "darwin", "arm64")


def _pytest_child(env: dict[str, str]) -> subprocess.CompletedProcess:
    # a cheap test that does not itself need the library: only the session rule can fail it
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_native_required_rule"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_library_fails_the_session_when_native_is_asked_for():
    r = _pytest_child(_clean_env(BITLM_BACKEND="native", BITLM_KERNELS_LIB="/nonexistent/libbitlm.so"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "native kernel library is required" in out and "/nonexistent/libbitlm.so" in out, out


@only_x86_64_linux
def test_missing_library_fails_the_session_on_x86_64_linux():
    r = _pytest_child(_clean_env(BITLM_KERNELS_LIB="/nonexistent/libbitlm.so"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "native kernel library is required" in out and ALLOW_NO_NATIVE in out, out
    # the explicit opt-out runs the suite on the reference kernels
    r = _pytest_child(_clean_env(BITLM_KERNELS_LIB="/nonexistent/libbitlm.so", **{ALLOW_NO_NATIVE: "1"}))
    assert r.returncode == 0, r.stdout + r.stderr


def _setup_tree(tmp_path: Path) -> Path:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "src/bitlm").mkdir(parents=True)
    (tmp_path / "src/bitlm/__init__.py").write_text("")
    return tmp_path


@only_x86_64_linux
def test_failed_kernel_build_fails_the_install(tmp_path):
    pytest.importorskip("setuptools")  # in the dev extra; only a bare interpreter lacks it
    tree = _setup_tree(tmp_path)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    # CC=false: every compile fails at once, as with a broken compiler
    r = subprocess.run(cmd, cwd=tree, env=_clean_env(CC="false"), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "building the native kernels failed" in r.stderr and ALLOW_NO_NATIVE in r.stderr, r.stderr
    assert not list((tree / "src/bitlm").glob("_bitlm_kernels*"))
    # the opt-out installs without the library (and the in-place copy step does not trip on it)
    r = subprocess.run(cmd, cwd=tree, env=_clean_env(CC="false", **{ALLOW_NO_NATIVE: "1"}), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: bitlm: building the native kernels failed" in r.stderr
    assert not list((tree / "src/bitlm").glob("_bitlm_kernels*"))


# ---------------------------------------------------------------------------------------------
# declared dependencies == imported dependencies
# ---------------------------------------------------------------------------------------------

# Declared for what they run, not for an import: test runner and linter (commands), the build
# backend's own requirements live in [build-system].
TOOLS = {"pytest", "ruff"}


def _load_pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only, at any depth)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party(imports: dict[str, set[str]], local: set[str]) -> dict[str, set[str]]:
    return {m: f for m, f in imports.items() if m not in sys.stdlib_module_names and m not in local and m != "__future__"}


# Imports of extras that the dev extra does not install (so packages_distributions cannot map them)
NOT_IN_DEV = {"llama_cpp": "llama-cpp-python"}  # [llama]: built from source, ~7 min; its tests skip without it


def _dists_of(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module)
    if not dists and module in NOT_IN_DEV:
        return {NOT_IN_DEV[module]}
    assert dists, f"import {module!r} belongs to no installed distribution (is the dev extra installed?)"
    return {_norm(d) for d in dists}


def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def test_every_third_party_import_in_src_is_declared():
    proj = _load_pyproject()["project"]
    core = {_req_name(r) for r in proj["dependencies"]}
    extras = {_req_name(r) for reqs in proj["optional-dependencies"].values() for r in reqs}
    used = _third_party(_imports(_py_files("src")), {"bitlm"})
    assert {"torch", "numpy", "safetensors", "tokenizers"} <= set(used)  # the scan sees imports at all
    undeclared = {m: sorted(f) for m, f in used.items() if not _dists_of(m) & (core | extras)}
    assert not undeclared, f"imported in src/ but declared nowhere in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_imported():
    proj = _load_pyproject()["project"]
    # core dependencies: imported by the package itself
    src_dists = set().union(*(_dists_of(m) for m in _third_party(_imports(_py_files("src")), {"bitlm"})))
    unused_core = {_req_name(r) for r in proj["dependencies"]} - src_dists
    assert not unused_core, f"core dependencies that nothing in src/ imports: {sorted(unused_core)}"
    # extras: imported by the package, the tests, the benchmarks or setup.py
    local = {"bitlm", "setup", *(p.stem for p in _py_files("tests", "benchmarks"))}
    everything = _third_party(_imports(_py_files("src", "tests", "benchmarks") + [ROOT / "setup.py"]), local)
    all_dists = set().union(*(_dists_of(m) for m in everything))
    extras = {(name, _req_name(r)) for name, reqs in proj["optional-dependencies"].items() for r in reqs}
    unused = sorted((name, d) for name, d in extras if d not in all_dists and d not in TOOLS)
    assert not unused, f"optional dependencies that nothing imports: {unused}"
