"""The library's architecture as the package docstrings state it: imports flow one way between its parts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each part and the parts it may import ("top" = the shared top-level modules of stenvan/).
ALLOWED = {
    "top": {"top"},
    "models": {"top", "models"},
    "data": {"top", "data"},
    "evaluation": {"top", "models", "data", "evaluation"},
    "training": {"top", "models", "data", "evaluation", "training"},
    "inference": {"top", "models", "data", "evaluation", "inference"},
    "prepare": {"top", "prepare"},
}


def part_of_module(name: str) -> str | None:
    """The part a dotted module name belongs to, None outside stenvan and prepare."""
    parts = name.split(".")
    if parts[0] == "prepare":
        return "prepare"
    if parts[0] != "stenvan":
        return None
    if len(parts) > 1 and parts[1] in ALLOWED and parts[1] != "top":
        return parts[1]
    return "top"


def part_of_file(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return part_of_module(".".join(rel.parts))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            # `from stenvan import distributed` imports the module stenvan.distributed
            found += [(node.lineno, f"{node.module}.{alias.name}" if node.module == "stenvan" else node.module)
                      for alias in node.names]
    return found


def library_files() -> list[Path]:
    files = sorted((REPO / "stenvan").rglob("*.py")) + sorted((REPO / "prepare").rglob("*.py"))
    # stenvan/__init__.py is the public facade: it re-exports names of every part, lazily
    return [f for f in files if f != REPO / "stenvan" / "__init__.py"]


def test_parts_import_only_the_parts_below_them():
    wrong = []
    for path in library_files():
        mine = part_of_file(path)
        for line, module in imported_modules(path):
            theirs = part_of_module(module)
            if theirs is not None and module != "stenvan" and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({mine}) imports {module} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The rule above is not vacuous: a top-level module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from stenvan.training.trainer import Trainer\n")
    (line, module), = imported_modules(bad)
    assert part_of_module(module) == "training" and "training" not in ALLOWED["top"]


def test_every_package_says_what_it_holds_and_may_import():
    for init in sorted((REPO / "stenvan").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init.relative_to(REPO)}: the docstring must say what the package may import"


@pytest.mark.parametrize("name", ["Embedder", "build_model", "load_original_checkpoint", "TrackletTable",
                                  "load_manifest", "dataset_fingerprint", "first_of_chunk_indices", "read_frame",
                                  "resize_frame"])
def test_public_api_and_import_stenvan_stays_cheap(name):
    code = ("import sys, stenvan; assert 'torch' not in sys.modules, 'import stenvan imported torch'; "
            f"obj = getattr(stenvan, {name!r}); assert obj.__name__ == {name!r}")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
