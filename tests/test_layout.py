"""The package's layers: the plugin never imports our trainer (megatron_fsam.trainer)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_fsam"
TRAINER = "megatron_fsam.trainer"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, absolute or relative, at any depth of the file
    (function-level imports count: they run too)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def plugin_to_trainer_edges(root: Path) -> list[str]:
    """`file -> module` for each import of the trainer by a module outside it."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        if module_name(path, root).startswith(TRAINER):
            continue
        for module in sorted(imported_modules(path, root)):
            if module == TRAINER or module.startswith(TRAINER + "."):
                edges.append(f"{path.relative_to(root.parent)} -> {module}")
    return edges


def test_the_plugin_never_imports_the_trainer():
    assert plugin_to_trainer_edges(PACKAGE) == []


def test_the_walk_finds_every_form_of_a_trainer_import(tmp_path):
    root = tmp_path / "megatron_fsam"
    (root / "trainer").mkdir(parents=True)
    (root / "integrations").mkdir()
    for init in ("__init__.py", "trainer/__init__.py", "integrations/__init__.py"):
        (root / init).write_text("")
    (root / "trainer" / "monitor.py").write_text("from megatron_fsam.step import SAMStep\n")
    (root / "step.py").write_text("def f():\n    from megatron_fsam.trainer.monitor import x\n")
    (root / "gate.py").write_text("from megatron_fsam import trainer\n")
    (root / "integrations" / "a.py").write_text("from ..trainer import monitor\n")
    (root / "integrations" / "b.py").write_text("import megatron_fsam.trainer.parallel\n")
    (root / "integrations" / "c.py").write_text("from .. import config\n")
    assert plugin_to_trainer_edges(root) == [
        "megatron_fsam/gate.py -> megatron_fsam.trainer",
        "megatron_fsam/integrations/a.py -> megatron_fsam.trainer",
        "megatron_fsam/integrations/a.py -> megatron_fsam.trainer.monitor",
        "megatron_fsam/integrations/b.py -> megatron_fsam.trainer.parallel",
        "megatron_fsam/step.py -> megatron_fsam.trainer.monitor",
        "megatron_fsam/step.py -> megatron_fsam.trainer.monitor.x",
    ]
