"""The package's shape: its layers point down, nothing imports in a circle, the
drivers stay apart, one module reads the clock, and importing it changes nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import celery_tx

PACKAGE_DIR = Path(celery_tx.__file__).resolve().parent

# Bottom first; a module may import from its own layer and the ones below.
LAYERS = [
    ["celery_tx.core"],
    [
        "celery_tx.clock",
        "celery_tx.ids",
        "celery_tx.context",
        "celery_tx.logs",
        "celery_tx.arguments",
        "celery_tx.present",
        "celery_tx.step_barrier",
    ],
    ["celery_tx.store"],
    ["celery_tx.handles", "celery_tx.metrics", "celery_tx.pending", "celery_tx.leases"],
    ["celery_tx.driver"],
    ["celery_tx.sweeps"],
    ["celery_tx.drivers"],
    ["celery_tx.operations"],
    ["celery_tx.coordinator"],
    ["celery_tx.cli", "celery_tx.web"],
    ["celery_tx"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _reexports(package: str) -> dict[str, str]:
    """Names a package's ``__init__`` hands on, and the module each comes from."""
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(MODULES[package].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("celery_tx"):
            for alias in node.names:
                found[alias.asname or alias.name] = _module_of(node.module or "", alias.name)
    return found


def _module_of(module: str, name: str) -> str:
    """What ``from module import name`` imports: a submodule, else ``module`` itself."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


def imports(name: str) -> set[str]:
    """The celery_tx modules ``name`` imports (``TYPE_CHECKING`` ones too), a
    package's re-exported names followed to the module that defines them."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "celery_tx"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "celery_tx":
            assert node.level == 0, f"{name}: relative import"
            module = node.module or ""
            for alias in node.names:
                target = _module_of(module, alias.name)
                if target == module and module not in ("celery_tx", name):
                    target = _reexports(module).get(alias.name, module)
                found.add(target)
    found.discard(name)
    return found


def layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "celery_tx"):
            return rank
    assert name == "celery_tx", f"{name} is in no layer: add it to LAYERS"
    return len(LAYERS) - 1


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_is_in_a_layer() -> None:
    """The layer list covers the package (a new module must be placed deliberately)."""
    assert len(MODULES) > 40
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    """A module imports only from its own layer and the layers below it."""
    upward = sorted(m for m in GRAPH[name] if layer(m) > layer(name))
    assert upward == [], f"{name} (layer {layer(name)}) imports from above: {upward}"


def test_no_import_circle() -> None:
    """No module reaches itself through the modules it imports."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            assert state.get(target) != 1, "circle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_drivers_do_not_import_each_other() -> None:
    """Each driver is a subpackage of its own, behind the one interface."""
    drivers = {"celery_tx.drivers.local", "celery_tx.drivers.celery_tasks"}
    for name, targets in GRAPH.items():
        for mine in drivers:
            if name.startswith(mine):
                other = (drivers - {mine}).pop()
                assert not any(t.startswith(other) for t in targets), (name, other)


def test_no_module_above_the_drivers_imports_their_insides_but_the_coordinator() -> None:
    """The sweeps and operators' calls know drivers only through ``celery_tx.driver``."""
    for name in ("celery_tx.sweeps", "celery_tx.operations", "celery_tx.metrics"):
        assert not any(t.startswith("celery_tx.drivers") for t in GRAPH[name]), name


# Wall-clock reads; time.monotonic and time.sleep measure durations and stay allowed.
CLOCK_READS = {"datetime.now", "datetime.utcnow", "datetime.today", "time.time", "date.today"}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"celery_tx.clock"}))
def test_only_the_clock_module_reads_the_time(name: str) -> None:
    """Every time recorded or compared comes from the one injectable clock."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    calls = [
        f"line {node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and f"{node.func.value.id}.{node.func.attr}" in CLOCK_READS
    ]
    assert calls == []


# A fresh interpreter imports the whole public API, and says what that changed.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    import celery.signals as s
    import prometheus_client

    before = {m.name for m in prometheus_client.REGISTRY.collect()}
    import celery_tx
    from celery_tx.store import observers
    import celery_tx.cli, celery_tx.web
    names = ("worker_process_init", "worker_init", "worker_ready", "worker_shutdown",
             "after_setup_logger", "after_setup_task_logger", "celeryd_init")
    print(json.dumps({
        "observers": len(observers.observing()),
        "receivers": {n: len(getattr(s, n).receivers) for n in names},
        "metrics": sorted({m.name for m in prometheus_client.REGISTRY.collect()} - before),
    }))
    """
)


def test_importing_celery_tx_installs_nothing() -> None:
    """No journal observer, Celery signal receiver or Prometheus metric exists until a
    coordinator or a Celery app's configuration installs it."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["observers"] == 0
    assert found["metrics"] == []
    assert set(found["receivers"].values()) == {0}, found["receivers"]


INSTALLED = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    import celery.signals as s
    from celery_tx import TransactionCoordinator, metrics
    from celery_tx.store import observers
    from celery_tx.drivers.celery_tasks.sweeping import SweepStep

    app = Celery("probe", broker="memory://")
    TransactionCoordinator(sys.argv[1], app=app).close()
    TransactionCoordinator(sys.argv[1], app=app).close()  # twice installs nothing more
    print(json.dumps({
        "observers": len(observers.observing()),
        "metrics": metrics.DEFAULT is not None,
        "steps": [step is SweepStep for step in app.steps["worker"]],
        "receivers": len(s.worker_process_init.receivers),
    }))
    """
)


def test_a_coordinator_with_an_app_installs_the_hooks_once(tmp_path: Path) -> None:
    """Metrics and transaction_finished on the journal's observer hook, the workers'
    sweep bootstep and their pool processes' sweeps: each once."""
    url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    out = subprocess.run(
        [sys.executable, "-c", INSTALLED, url], capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found == {"observers": 2, "metrics": True, "steps": [True], "receivers": 1}


BOUND = textwrap.dedent(
    """
    import json
    from celery import Celery
    from celery_tx import metrics
    from celery_tx.store import observers
    from celery_tx.drivers.celery_tasks.sweeping import SweepStep
    import tests.apps.tasks  # participants, and no coordinator

    app = Celery("probe", broker="memory://")
    app.finalize()  # binds the shared participant tasks, as a worker's start does
    print(json.dumps({
        "observers": len(observers.observing()),
        "metrics": metrics.DEFAULT is not None,
        "steps": [step is SweepStep for step in app.steps["worker"]],
    }))
    """
)


def test_an_app_with_participants_gets_the_hooks_without_a_coordinator() -> None:
    """A worker whose app only imports its participant tasks still sweeps, counts
    metrics and sends transaction_finished: binding a participant installs them."""
    root = PACKAGE_DIR.parent
    out = subprocess.run(
        [sys.executable, "-c", BOUND], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found == {"observers": 2, "metrics": True, "steps": [True]}
