"""CPU seconds spent by groups of processes, read from ``/proc`` (Linux only).

The benchmarks use it to say where a side's time goes on a machine whose cores
are shared by the client, the worker, the database and the broker: the CPU
each group used per transaction, measured around one side's run. A group is a
process and its descendants, the live ones read directly and the ended ones
through their parent's ``cutime``/``cstime`` (a PostgreSQL backend that exits
is counted by the postmaster that reaped it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command may hold spaces and parentheses: fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_seconds(root: int, tree: dict[int, list[int]] | None = None) -> float:
    """CPU seconds of ``root`` and its descendants, ended ones included."""
    tree = _children() if tree is None else tree
    fields = _stat(root)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after the command.
    own = sum(int(value) for value in fields[11:15]) / _TICK
    return own + sum(tree_seconds(child, tree) for child in tree.get(root, ()))


def pids_named(*names: str) -> list[int]:
    """The top processes whose command is one of ``names`` (no ancestor of that name)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            fields = _stat(int(entry.name))
            if comm in names and fields is not None:
                found[int(entry.name)] = int(fields[1])
    return [pid for pid, parent in found.items() if parent not in found]


class Groups:
    """Named groups of process trees, whose CPU seconds can be read together."""

    def __init__(self, groups: dict[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}

    def seconds(self) -> dict[str, float]:
        """Each group's CPU seconds so far; ``client``: this process's."""
        tree = _children()
        found = {
            name: sum(tree_seconds(pid, tree) for pid in pids) for name, pids in self.groups.items()
        }
        times = os.times()
        found["client"] = times.user + times.system
        return found


def per_transaction(
    before: dict[str, float], after: dict[str, float], transactions: int
) -> dict[str, float]:
    """Milliseconds of CPU per transaction, by group."""
    return {name: 1000 * (after[name] - before[name]) / transactions for name in after}
