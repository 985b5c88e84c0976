"""The package imports follow the layers docs/architecture.md draws: nothing imports upwards, and
the gateway side never imports torch or diffusers when its modules are imported."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "omnirt"

#: bottom to top, as docs/architecture.md ("Layers") draws them; a module may import its own
#: layer and those below. A name maps to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("omnirt", "omnirt.contract", "omnirt.backends", "omnirt.registry", "omnirt.tasks",
                    "omnirt.webhooks.urls", "omnirt.webhooks.model", "omnirt.webhooks.settings",
                    "omnirt.webhooks.signing")),
    ("telemetry", ("omnirt.telemetry",)),
    ("engine", ("omnirt.engine", "omnirt.models")),
    ("store", ("omnirt.store",)),
    ("workers", ("omnirt.workers",)),
    ("jobs", ("omnirt.jobs",)),
    ("delivery", ("omnirt.webhooks", "omnirt.fleet")),
    ("gateway", ("omnirt.gateway",)),
    ("config", ("omnirt.config",)),
    ("composition", ("omnirt.service", "omnirt.workers.service")),
    ("entry", ("omnirt.cli", "omnirt.__main__", "omnirt.commands", "omnirt.bench")),
]

#: modules the gateway process imports; none may pull in the diffusion stack at import time
GATEWAY_SIDE = ("omnirt.service", "omnirt.config.serve", "omnirt.commands.serve", "omnirt.gateway",
                "omnirt.jobs", "omnirt.store", "omnirt.webhooks", "omnirt.fleet", "omnirt.telemetry",
                "omnirt.workers.pool", "omnirt.workers.grpc", "omnirt.workers.local", "omnirt.workers.spec")
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "torch_npu")


def layer_of(name: str) -> int:
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    return level


def modules() -> dict[str, Path]:
    """Every hand-written module under omnirt/ (the generated gRPC code excepted)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[:3] == ("omnirt", "workers", "proto"):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, *, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file: module-level and inside functions,
    or (``module_level_only``) those that run when the module is imported."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level_only and isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(child: ast.AST) -> None:
        if isinstance(child, ast.Import):
            found.extend((child.lineno, alias.name) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")[: len(package.split(".")) - child.level + 1]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            found.append((child.lineno, target))
            # ``from omnirt.workers import tls`` imports the submodule omnirt.workers.tls
            found.extend((child.lineno, f"{target}.{alias.name}") for alias in child.names
                         if f"{target}.{alias.name}" in ALL)
        visit(child)

    visit(tree)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


ALL = modules()


class LayeringTests(unittest.TestCase):
    def test_every_module_has_a_layer(self):
        """Each module under omnirt/ belongs to one of the documented layers."""
        self.assertEqual([name for name in ALL if layer_of(name) < 0], [])

    def test_no_import_points_up(self):
        """No module imports (at module level or inside a function) a module of a higher layer."""
        upward = []
        for name, path in ALL.items():
            mine = layer_of(name)
            for line, target in imports(name, path):
                if not target.startswith("omnirt") or target not in ALL and target.rpartition(".")[0] not in ALL:
                    continue
                theirs = layer_of(target)
                if theirs > mine:
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {target} "
                                  f"({LAYERS[theirs][0]})")
        self.assertEqual(upward, [])

    def test_layers_match_the_architecture_document(self):
        """docs/architecture.md names the same layers, in the same order, as this test enforces."""
        text = (ROOT / "docs" / "architecture.md").read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
        positions = [text.find(f"| {label} |") for label, _ in LAYERS]
        self.assertNotIn(-1, positions, "a layer is missing from the table in docs/architecture.md")
        self.assertEqual(positions, sorted(positions, reverse=True))

    def test_gateway_side_never_imports_the_diffusion_stack(self):
        """Importing any gateway-side module (following omnirt's own module-level imports) never
        imports torch, diffusers, transformers, peft or accelerate: they run without the extra."""
        gateway_side = [name for name in ALL if any(name == p or name.startswith(p + ".") for p in GATEWAY_SIDE)]
        self.assertIn("omnirt.gateway.app", gateway_side)
        heavy = []
        for start in gateway_side:
            seen, todo = set(), [start]
            while todo:
                name = todo.pop()
                if name in seen:
                    continue
                seen.add(name)
                for line, target in imports(name, ALL[name], module_level_only=True):
                    if target.split(".")[0] in HEAVY:
                        heavy.append(f"{start} -> {ALL[name].relative_to(ROOT)}:{line} imports {target}")
                    for candidate in _with_parents(target):
                        if candidate in ALL:
                            todo.append(candidate)
        self.assertEqual(sorted(set(heavy)), [])

    def test_the_checker_sees_function_level_imports(self):
        """The import scan reads imports inside functions too (so a lazy upward import is caught),
        and the module-level scan leaves them out."""
        name = "omnirt.config.serve"
        every = {target for _, target in imports(name, ALL[name])}
        top = {target for _, target in imports(name, ALL[name], module_level_only=True)}
        self.assertIn("omnirt.gateway.auth", every)
        self.assertNotIn("omnirt.gateway.auth", top)


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a.b.c, a.b, a]: importing a module runs its packages' __init__ too."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
