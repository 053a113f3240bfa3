"""Render the reliability suite's measured results into ``RELIABILITY.md``.

    python -m tests.reliability.report [RESULTS_JSON] [OUTPUT_MD]

Every number in the output comes from the results file that the suite's tests wrote.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.reliability.results import ROOT, load, results_path

INTRO = """# Reliability and security

The reliability suite (`tests/reliability/`, marker `reliability`) proves that under faults
and bad input the system keeps working, loses nothing and lets nothing in. Run it with

```bash
make reliability     # builds .venv like make test, runs the suite, rewrites this page
```

Each row is a scenario; a trial is one independent run of it (a kill at a random moment,
one damaged file, one bad input...). Random moments and damaged bytes come from a seeded
generator (`SWARM_RELIABILITY_SEED`, trials per kill scenario `SWARM_RELIABILITY_TRIALS`).
*Rows lost / duplicated* compare, row by row, what a scenario's outputs hold with what
they should hold (the source rows, or an undisturbed run's outputs); *n/a* where a
scenario produces no rows (an error is the expected outcome)."""


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def render(doc: dict, commit: str) -> str:
    scenarios = sorted(doc["scenarios"].values(), key=lambda s: s["section"])
    session = doc.get("session", {})
    lines = [INTRO, ""]
    when = session.get("finished", "?")
    runtime = f"{session['seconds'] / 60:.1f} min" if "seconds" in session else "?"
    total = sum(s["trials"] for s in scenarios)
    passed = sum(s["passed"] for s in scenarios)
    lines.append(f"Last run: {when}, commit `{commit}`, {session.get('cpus', '?')} cores; "
                 f"{len(scenarios)} scenarios, {passed} of {total} trials passed, suite runtime {runtime}"
                 f"{'' if session.get('exit_status', 0) == 0 else ' (the suite FAILED: see below)'}.")
    section = None
    for s in scenarios:
        if s["section"] != section:
            section = s["section"]
            lines += ["", f"## {section}", "",
                      "| scenario | trials | passed | rows checked | rows lost | rows duplicated | time |",
                      "|---|--:|--:|--:|--:|--:|--:|"]
        rows = _cell(s["rows_checked"]) if s["rows_lost"] is not None else "n/a"
        lines.append(f"| {s['name']} | {s['trials']} | {s['passed']} | {rows} | {_cell(s['rows_lost'])} | "
                     f"{_cell(s['rows_duplicated'])} | {s['seconds']:.0f} s |")
    notes = [(s["name"], n) for s in scenarios for n in s["notes"]]
    if notes:
        lines += ["", "## How each scenario was measured", ""]
        lines += [f"- **{name}**: {note}" for name, note in notes]
    failures = [(s["name"], f) for s in scenarios for f in s["failures"]]
    if failures:
        lines += ["", "## Failed trials", ""]
        lines += [f"- **{name}**: `{failure}`" for name, failure in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else results_path()
    target = Path(argv[1]) if len(argv) > 1 else ROOT / "RELIABILITY.md"
    doc = load(source)
    if not doc["scenarios"]:
        print(f"no results in {source}; run the suite first (make reliability)", file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "?"
    text = render(doc, commit)
    target.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
