"""The core is pure: no Celery, Kombu, SQLAlchemy or psycopg imports, and no clock reads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import celery_tx

PACKAGE_DIR = Path(celery_tx.__file__).resolve().parent
CORE_DIR = PACKAGE_DIR / "core"
CORE_FILES = sorted(CORE_DIR.glob("*.py"))
FORBIDDEN = ("celery", "kombu", "sqlalchemy", "psycopg")

# Calls that read a clock, as fully qualified names after resolving import aliases.
CLOCK_READS = frozenset(
    {
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
        "time.time",
        "time.time_ns",
        "time.monotonic",
        "time.monotonic_ns",
        "time.perf_counter",
        "time.perf_counter_ns",
        "time.localtime",
        "time.gmtime",
        "time.ctime",
        "uuid.uuid1",
    }
)

# Runs in a fresh interpreter. ``import celery_tx.core.status`` would first execute
# ``celery_tx/__init__.py``, which imports the coordinator and so SQLAlchemy: that
# says nothing about the core. So a bare module with ``__path__`` set to the package
# folder stands in for ``celery_tx``; Python then finds ``celery_tx.core.*`` through
# that path and runs only the core's own code and whatever the core imports.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, sys, types

    package_dir, forbidden = sys.argv[1], sys.argv[2].split(",")
    baseline = set(sys.modules)
    stub = types.ModuleType("celery_tx")
    stub.__path__ = [package_dir]
    sys.modules["celery_tx"] = stub

    core = importlib.import_module("celery_tx.core")
    names = ["celery_tx.core"]
    for info in pkgutil.iter_modules(core.__path__, "celery_tx.core."):
        importlib.import_module(info.name)
        names.append(info.name)

    def is_forbidden(module):
        return any(module == f or module.startswith(f + ".") for f in forbidden)

    print(json.dumps({
        "imported": names,
        "stub_intact": sys.modules["celery_tx"] is stub,
        "forbidden_loaded": sorted(m for m in sys.modules if is_forbidden(m)),
        "forbidden_at_start": sorted(m for m in baseline if is_forbidden(m)),
        # Loaded counts as installed: kombu swaps in a lazy module without __spec__,
        # on which find_spec raises.
        "installed": {
            f: f in sys.modules or importlib.util.find_spec(f) is not None for f in forbidden
        },
        "celery_tx_loaded": sorted(m for m in sys.modules if m.startswith("celery_tx")),
    }))
    """
)


def run_probe(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (no site-user, no PYTHON* env) and parse its JSON."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, str(PACKAGE_DIR), ",".join(FORBIDDEN)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_core_imports_load_no_framework() -> None:
    """Importing every celery_tx.core module loads no celery, kombu, sqlalchemy or psycopg module.

    ``import celery_tx.core.x`` always runs ``celery_tx/__init__.py`` first, and that
    imports the coordinator (hence SQLAlchemy), so the probe stubs ``celery_tx`` with
    a bare module whose ``__path__`` is the package folder: only the core's own
    imports run, and any framework module they pull in shows up in ``sys.modules``.
    """
    result = run_probe(PROBE)
    expected = {"celery_tx.core", *(f"celery_tx.core.{p.stem}" for p in CORE_FILES)}
    expected.discard("celery_tx.core.__init__")
    assert set(result["imported"]) == expected
    assert result["stub_intact"] is True
    assert result["forbidden_at_start"] == []
    assert result["forbidden_loaded"] == []
    # The core depends on nothing else in the package either.
    loaded = set(result["celery_tx_loaded"])
    assert loaded == expected | {"celery_tx"}


def test_probe_would_notice_a_framework_import() -> None:
    """The probe has teeth: the frameworks are installed, and the real package does load them."""
    result = run_probe(PROBE.replace('sys.modules["celery_tx"] = stub', "import celery_tx"))
    installed = result["installed"]
    assert isinstance(installed, dict)
    assert installed["sqlalchemy"] is True
    assert installed["celery"] is True
    assert "sqlalchemy" in result["forbidden_loaded"]


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from every import in ``tree``."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute lookups on a name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def impurities(source: str) -> list[str]:
    """Forbidden imports and clock reads in ``source``, one description each."""
    tree = ast.parse(source)
    found: list[str] = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            # ``from time import time`` is a clock read waiting to happen.
            found += [
                f"line {node.lineno}: imports {node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in CLOCK_READS
            ]
        line = getattr(node, "lineno", 0)
        found += [
            f"line {line}: imports {module}"
            for module in modules
            if module.split(".")[0] in FORBIDDEN
        ]
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        qualified = ".".join(filter(None, [aliases.get(head, head), rest]))
        if qualified in CLOCK_READS or dotted in {"datetime.now", "datetime.utcnow"}:
            found.append(f"line {node.lineno}: calls {dotted}")
    return found


def test_core_files_are_found() -> None:
    """The AST scan covers every module of the core (the list is not empty or stale)."""
    assert {p.name for p in CORE_FILES} >= {
        "__init__.py",
        "errors.py",
        "outcome.py",
        "retry.py",
        "status.py",
        "transitions.py",
    }


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_source_has_no_framework_import_or_clock_read(path: Path) -> None:
    """A core module neither imports celery/kombu/sqlalchemy/psycopg nor reads a clock."""
    assert impurities(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_source_imports_only_core_from_the_package(path: Path) -> None:
    """A core module imports nothing from celery_tx outside celery_tx.core (layers point down)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            module = node.module or ""
        elif isinstance(node, ast.Import):
            module = ",".join(alias.name for alias in node.names)
        else:
            continue
        for name in module.split(","):
            if name.split(".")[0] == "celery_tx":
                assert name.startswith("celery_tx.core"), f"{path.name} imports {name}"


@pytest.mark.parametrize(
    ("source", "hits"),
    [
        ("import celery\n", 1),
        ("from kombu.utils import uuid\n", 1),
        ("import sqlalchemy as sa\n", 1),
        ("import psycopg.rows\n", 1),
        ("from datetime import datetime\nx = datetime.now()\n", 1),
        ("import datetime\nx = datetime.datetime.utcnow()\n", 1),
        ("from datetime import datetime as dt\nx = dt.now()\n", 1),
        ("import time\nx = time.time()\n", 1),
        ("import time as t\nx = t.monotonic()\n", 1),
        ("from time import monotonic\nx = monotonic()\n", 2),
        ("from datetime import datetime, timedelta\nx: datetime\ny = timedelta(1)\n", 0),
        ("import celery_tx.core.status\nimport celeryish\n", 0),
    ],
)
def test_impurity_scanner_catches_what_it_should(source: str, hits: int) -> None:
    """The AST scanner flags framework imports and clock reads, and nothing innocent."""
    assert len(impurities(source)) == hits, impurities(source)
