"""The module layering the code relies on (docs/architecture.md): file formats (``bitlm.io``)
sit below the modules that build models from them, so reading a format never pulls in the
engine, the Llama converter or LoRA, and the format dispatch lives above them in
``bitlm.loading``."""

import ast
from pathlib import Path

import bitlm

IO_DIR = Path(bitlm.__file__).parent / "io"
FORBIDDEN = {"bitlm.engine", "bitlm.convert", "bitlm.lora", "bitlm.loading"}


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in ``path`` (function bodies included)."""
    pkg = ["bitlm", "io"]  # the package of every file in io/
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from .. import engine`
    return names


def test_io_never_imports_engine_convert_lora_or_loading():
    files = sorted(IO_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "packed.py", "checkpoint.py", "hf.py", "gguf.py"}
    bad = {f.name: sorted(m for m in _imported_modules(f) if any(m == b or m.startswith(b + ".") for b in FORBIDDEN))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_import_walker_sees_relative_and_lazy_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..engine import load_packed\n    from .. import lora\n    import bitlm.convert\n")
    assert {"bitlm.engine", "bitlm.lora", "bitlm.convert"} <= _imported_modules(f)


def test_public_load_save_are_the_dispatch():
    import bitlm.loading

    assert bitlm.load is bitlm.loading.load and bitlm.save is bitlm.loading.save


def test_omp_wait_policy_is_set_by_importing_bitlm_alone():
    """One place sets OMP_WAIT_POLICY=PASSIVE (bitlm/__init__.py): the CLI, tests and benchmarks
    get it by importing bitlm before torch, and a user's own setting is kept."""
    import os
    import subprocess
    import sys

    code = "import bitlm.cli, os, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


ROOT = Path(__file__).resolve().parent.parent


def _env_vars_read() -> dict[str, str]:
    """Every ``BITLM_*`` environment variable the code reads -> one file that reads it: string
    literals in the package, setup.py, the benchmarks and tests/conftest.py (the test-session
    rule), and ``getenv("...")`` in csrc/."""
    import re

    found: dict[str, str] = {}
    py = [*sorted((ROOT / "src" / "bitlm").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
          ROOT / "setup.py", ROOT / "tests" / "conftest.py"]
    for f in py:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                # BITLM_HAVE_*: the compile-time macros setup.py defines for the ISA files, not variables
                if re.fullmatch(r"BITLM_[A-Z0-9_]+", node.value) and not node.value.startswith("BITLM_HAVE_"):
                    found.setdefault(node.value, str(f.relative_to(ROOT)))
    for f in sorted((ROOT / "csrc").glob("*.[ch]")):
        for name in re.findall(r'getenv\(\s*"(BITLM_[A-Z0-9_]+)"', f.read_text()):
            found.setdefault(name, str(f.relative_to(ROOT)))
    return found


def test_every_environment_variable_is_in_the_architecture_table():
    """docs/architecture.md lists every environment variable bitlm reads (doc drift made the
    table miss BITLM_VERIFY, BITLM_ALLOW_NO_NATIVE and BITLM_BENCH_CACHE)."""
    found = _env_vars_read()
    assert {"BITLM_BACKEND", "BITLM_KERNEL_TIER", "BITLM_NUM_THREADS", "BITLM_VERIFY"} <= set(found)  # the scan works
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Environment variables"):]
    missing = {name: where for name, where in found.items() if f"`{name}`" not in table}
    assert not missing, f"add to docs/architecture.md's environment table: {missing}"
