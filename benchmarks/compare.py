"""Compare two saved pytest-benchmark runs of the benchmark cases (the JSON
of ``--benchmark-json`` or ``--benchmark-save``): the median of every case
present in both, the change, and the regressions beyond a threshold.

    python -m segops.benchmarks.compare OLD.json NEW.json [--threshold 10]
    python -m segops.benchmarks.compare --latest benchmarks/results/<card> [--family conv]

The first prints the table and exits 1 when a case got slower by more than
``--threshold`` percent (its median); the second prints the path of the
latest saved run in a card's folder (of one family, for runs saved as
``<commit>_<family>``), or nothing. pytest-benchmark's own comparison reads
the same files (``--benchmark-compare``, ``--benchmark-compare-fail``,
``pytest-benchmark compare``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

SAVED = re.compile(r"^(\d{4})_(.*)\.json$")  # pytest-benchmark's NNNN_<name>.json


@dataclasses.dataclass
class Change:
    """One case in both runs: medians in ms and new / old - 1 in percent."""
    name: str
    old_ms: float
    new_ms: float

    @property
    def percent(self) -> float:
        return (self.new_ms / self.old_ms - 1.0) * 100.0


def load(path) -> dict[str, float]:
    """{test name: median ms} of a saved run (errored rows carry no stats)."""
    data = json.loads(Path(path).read_text())
    return {b["fullname"]: b["stats"]["median"] * 1e3 for b in data["benchmarks"]
            if b.get("stats")}


def compare(old_path, new_path) -> tuple[list[Change], list[str], list[str]]:
    """(changes of the cases in both runs, names only in the old one, names
    only in the new one)."""
    old, new = load(old_path), load(new_path)
    changes = [Change(name, old[name], new[name]) for name in old if name in new]
    return changes, sorted(set(old) - set(new)), sorted(set(new) - set(old))


def regressions(changes: list[Change], threshold: float) -> list[Change]:
    """The cases whose median grew by more than ``threshold`` percent."""
    return [c for c in changes if c.percent > threshold]


def format_changes(changes: list[Change], threshold: float) -> str:
    width = max([10] + [len(c.name) for c in changes])
    lines = [f"{'case':<{width}} {'old ms':>10} {'new ms':>10} {'change':>8}"]
    for c in sorted(changes, key=lambda c: -c.percent):
        flag = "  REGRESSION" if c.percent > threshold else ""
        lines.append(f"{c.name:<{width}} {c.old_ms:>10.3f} {c.new_ms:>10.3f} "
                     f"{c.percent:>+7.1f}%{flag}")
    return "\n".join(lines)


def latest(folder, family: str | None = None) -> Path | None:
    """The latest saved run under ``folder`` (pytest-benchmark's storage:
    ``<folder>/<machine>/NNNN_<name>.json``), by number then modification
    time; with ``family``, only runs whose name ends in ``_<family>``."""
    found = []
    for path in Path(folder).glob("*/*.json"):
        match = SAVED.match(path.name)
        if match and (family is None or match.group(2).endswith(f"_{family}")):
            found.append((int(match.group(1)), path.stat().st_mtime, path))
    return max(found)[2] if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="OLD.json NEW.json")
    parser.add_argument("--threshold", type=float, default=10.0,
                        help="percent slower that counts as a regression (default 10)")
    parser.add_argument("--latest", metavar="FOLDER", help="print the latest saved run's path")
    parser.add_argument("--family", default=None, help="with --latest: runs of this family")
    args = parser.parse_args(argv)
    if args.latest:
        found = latest(args.latest, args.family)
        if found:
            print(found)
        return 0
    if len(args.runs) != 2:
        parser.error("give two saved runs: OLD.json NEW.json")
    changes, gone, added = compare(*args.runs)
    print(format_changes(changes, args.threshold))
    for label, names in (("only in the old run", gone), ("only in the new run", added)):
        if names:
            print(f"{len(names)} cases {label}")
    bad = regressions(changes, args.threshold)
    print(f"{len(bad)} regressions beyond {args.threshold:g}% of {len(changes)} cases compared")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
