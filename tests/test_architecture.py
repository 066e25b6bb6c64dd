"""Dependency direction between the packages of app/, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"

# package -> prefixes it must never import
FORBIDDEN = {
    "app.compression": ("fastapi", "starlette", "sqlalchemy", "celery", "app.api", "app.main", "app.services",
                        "app.storage", "app.settings", "app.worker", "app.errors", "app.metrics", "app.runtime",
                        "app.formats"),
    "app.services": ("fastapi", "starlette", "app.api", "app.main"),
    "app.storage": ("fastapi", "starlette", "app.api", "app.main", "app.services"),
    "app.runtime": ("fastapi", "starlette", "app.api", "app.main", "app.services", "app.storage"),
    "app.generation": ("fastapi", "starlette", "app.api", "app.main", "app.services", "app.storage", "app.worker"),
    "app.formats": ("fastapi", "starlette", "app.api", "app.main", "app.services", "app.storage"),
    "app.errors": ("fastapi", "starlette"),
    "app.settings": ("fastapi", "starlette", "app.api", "app.main"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    return ".".join(("app", *path.relative_to(APP).with_suffix("").parts))


def test_layers_import_only_downwards() -> None:
    violations = []
    for path in APP.rglob("*.py"):
        module = _module_name(path)
        for package, banned in FORBIDDEN.items():
            if module == package or module.startswith(package + "."):
                for imported in _imports(path):
                    if any(imported == b or imported.startswith(b + ".") for b in banned):
                        violations.append(f"{module} imports {imported}")
    assert violations == []


def test_nothing_imports_the_web_layer_or_the_composition_root() -> None:
    offenders = []
    for path in APP.rglob("*.py"):
        module = _module_name(path)
        if module.startswith("app.api") or module in ("app.main", "app.cli", "app.__main__"):
            continue
        offenders += [f"{module} imports {i}" for i in _imports(path) if i.startswith(("app.api", "app.main"))]
    assert offenders == []


def test_the_server_never_imports_torch_or_transformers() -> None:
    # Both take seconds and gigabytes to import; only job processes (conversion, compression) need them.
    code = ("import sys, app.main, app.services.text, app.api.openai, app.formats.huggingface, app.text.answers;"
            "app.main.create_app; print(sorted(m for m in ('torch', 'transformers', 'keras', 'tensorflow') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=APP.parent, capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"
