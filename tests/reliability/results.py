"""Measured results of the reliability suite, one record per scenario, in a JSON file.

Tests count what they ran (``trials``, ``passed``) and what they checked (rows lost and
duplicated); ``report.py`` renders the file into ``RELIABILITY.md``. No figure is typed
by hand: a scenario that did not run has no row.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_ENV = "SWARM_RELIABILITY_RESULTS"
DEFAULT_RESULTS = ROOT / "build" / "reliability" / "results.json"


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


@dataclass
class Scenario:
    """One row of the table: a scenario, its trials and what they lost or duplicated."""

    section: str
    name: str
    trials: int = 0
    passed: int = 0
    rows_checked: int = 0
    rows_lost: int | None = None  # None: no rows to count in this scenario
    rows_duplicated: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.section} | {self.name}"

    def rows(self, checked: int, lost: int, duplicated: int) -> None:
        """Add one trial's row accounting."""
        self.rows_checked += checked
        self.rows_lost = (self.rows_lost or 0) + lost
        self.rows_duplicated = (self.rows_duplicated or 0) + duplicated

    def note(self, text: str) -> None:
        """How the scenario was measured (rendered under the table)."""
        if text not in self.notes:
            self.notes.append(text)
            save(self)

    @contextmanager
    def trial(self, label: str, reraise: bool = False):
        """One trial: passed when the block finishes, failed (with its error kept) when it raises."""
        self.trials += 1
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a failed trial is a result, reported below
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:400]} "
                                 f"({Path(where.filename).name}:{where.lineno})")
            if reraise:
                raise
        else:
            self.passed += 1
        finally:
            self.seconds += time.perf_counter() - started
            save(self)

    def check(self) -> None:
        """Fail the test if any trial failed, listing every failure."""
        assert not self.failures, f"{len(self.failures)} of {self.trials} trial(s) failed:\n" + "\n".join(self.failures)


_OPEN: dict[str, Scenario] = {}


def scenario(section: str, name: str) -> Scenario:
    """The scenario of that name in this session (created on first use)."""
    found = Scenario(section, name)
    return _OPEN.setdefault(found.key, found)


def save(item: Scenario) -> None:
    """Merge one scenario into the results file (several test processes may share it)."""
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = load(path)
        doc["scenarios"][item.key] = asdict(item)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)


def save_session(seconds: float, exit_status: int) -> None:
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = load(path)
        doc["session"] = {"seconds": round(seconds, 1), "exit_status": exit_status,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)


def load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        doc = {}
    doc.setdefault("scenarios", {})
    return doc
