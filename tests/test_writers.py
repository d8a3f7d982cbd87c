"""Every file bitlm writes goes through ``bitlm.io.atomic`` (temp sibling, fsync, rename, normal
modes): a scan of the source for raw writes, and the JSON / plot outputs of the CLI verbs."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

import bitlm

SRC = Path(bitlm.__file__).resolve().parent

# function -> why a raw write there is safe (by name: modules move, the functions keep their jobs)
ALLOWED = {
    "_write_safetensors": "io.hf: writes into the temp folder of save_hf's atomic_dir",
    "_write_meta": "io.checkpoint: writes into the temp folder of save_checkpoint's atomic_dir",
    "fetch_debian_package": "data: the completion marker inside a mkdtemp tree that is renamed into place",
    "_probe_main": "demo: resets the kernel's peak-RSS counter by writing /proc/self/clear_refs, not a file",
    "_train": "train: metrics.jsonl, an append-only log flushed per line; resume rewrites it atomically",
}
WRITE_METHODS = {"write_text", "write_bytes", "savefig", "to_csv", "to_parquet", "to_json"}
SAVE_FUNCS = {"save_file", "save", "dump"}  # safetensors save_file, torch.save / np.save, json.dump


def _mentions_tmp(node: ast.AST) -> bool:
    """The path expression is built from a name ``tmp`` (atomic_write's / atomic_dir's temp)."""
    return any(isinstance(n, ast.Name) and n.id == "tmp" for n in ast.walk(node))


def _raw_writes(path: Path) -> list[tuple[str, int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    handles = {  # `with open(...) as f`: writes to f are judged at the open() call
        item.optional_vars.id
        for w in ast.walk(tree) if isinstance(w, (ast.With, ast.AsyncWith))
        for item in w.items
        if isinstance(item.optional_vars, ast.Name) and isinstance(item.context_expr, ast.Call)
        and ast.unparse(item.context_expr.func) in ("open", "os.fdopen")
    }

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Call):
            f = node.func
            target = None
            if isinstance(f, ast.Attribute) and f.attr in WRITE_METHODS:
                target = f.value if f.attr in ("write_text", "write_bytes") else (node.args[0] if node.args else f)
            elif isinstance(f, (ast.Attribute, ast.Name)) and (f.attr if isinstance(f, ast.Attribute) else f.id) in SAVE_FUNCS:
                name = f.attr if isinstance(f, ast.Attribute) else f.id
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
                if name == "save_file" or (name == "save" and owner in ("torch", "np", "numpy")) or \
                        (name == "dump" and owner == "json"):
                    target = node.args[1] if name != "save" or owner != "np" else node.args[0]
            elif isinstance(f, ast.Name) and f.id == "open" or (isinstance(f, ast.Attribute) and f.attr == "fdopen"):
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                    target = node.args[0]
            if isinstance(target, ast.Name) and target.id in handles:
                target = None
            if target is not None and not _mentions_tmp(target):
                found.append((func, node.lineno, ast.unparse(node)[:80]))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_no_raw_writes_outside_the_atomic_helper():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "io/atomic.py":
            continue
        for func, line, code in _raw_writes(path):
            if func not in ALLOWED:
                bad.append(f"{rel}:{line} in {func}(): {code}")
    assert not bad, "write through bitlm.io.atomic (atomic_write / atomic_write_text / atomic_dir):\n" + "\n".join(bad)


def test_the_scan_finds_raw_writes(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import json, torch\nfrom pathlib import Path\n"
                 "def a(p):\n    Path(p).write_text('x')\n"
                 "def b(p, fig):\n    fig.savefig(p)\n"
                 "def c(p, sd):\n    torch.save(sd, p)\n"
                 "def d(p):\n    with open(p, 'w') as fh:\n        json.dump({}, fh)\n"
                 "def e(tmp):\n    tmp.write_text('fine')\n    open(tmp, 'wb')\n")
    assert [func for func, _, _ in _raw_writes(f)] == ["a", "b", "c", "d"]  # d: once, at its open()


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def spy(monkeypatch):
    """Paths written through bitlm.io.atomic.atomic_write."""
    import bitlm.io.atomic as A

    seen, real = [], A.atomic_write
    monkeypatch.setattr(A, "atomic_write", lambda path, write: seen.append(Path(path)) or real(path, write))
    return seen


def test_energy_json(tmp_path, spy):
    from bitlm.cli import main

    out = tmp_path / "e.json"
    out.write_text("old")
    os.chmod(out, 0o600)
    assert main(["energy", "--preset", "tiny", "--json", str(out)]) == 0
    assert spy == [out] and "reports" in json.loads(out.read_text())
    assert _mode(out) == 0o666 & ~_umask()  # a new file's mode, not the old one's


def test_experiment_plot(tmp_path, spy):
    from bitlm.experiments import _plt, _save_fig

    plt = _plt()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert _save_fig(fig, tmp_path / "p.png") == "p.png"
    assert spy == [tmp_path / "p.png"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def _umask() -> int:
    from bitlm.io.atomic import umask

    return umask()
