"""``make security-report``: run the security tests and print what they measured as Markdown.

Runs, in one pytest session (real Apache, gunicorn, helper, mail and DNS processes, as root):

* the escape battery (``tests/security/test_escape_battery.py``): every attempt, both modes,
  syscall filter on and off;
* the fail-closed cases (``tests/integration/test_fail_closed.py``) and the syscall filter tests
  (``tests/integration/test_seccomp.py``);
* the crash tests: ``kill -9`` of the mail service mid-submission
  (``tests/integration/test_mail_crash.py``), of the helper and its forker, and of jailed
  workers under Apache and gunicorn;
* the load tests (``tests/security/test_load.py``).

Tests feed their measurements through pytest's ``record_property``; a small plugin here collects
them with each test's outcome into ``build/security-results.json``, and the tables are built only
from that file and from ``build/fuzz-report.json`` (written by ``make fuzz``; "not run" when it
is absent).  Nothing in the tables is a constant.  The exit status is non-zero when any test
failed or errored, or a fuzz target reported a crash.

This lives beside the tests rather than in ``bench/``: it measures what the security tests
observe (attempts blocked, messages lost, load held), not timings against a baseline.

Usage::

    python tests/security/report.py [extra pytest arguments]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "build" / "security-results.json"
FUZZ_REPORT = ROOT / "build" / "fuzz-report.json"

ESCAPE = "tests/security/test_escape_battery.py"
LOAD = "tests/security/test_load.py"
FAIL_CLOSED = "tests/integration/test_fail_closed.py"
SECCOMP = "tests/integration/test_seccomp.py"
MAIL_CRASH = "tests/integration/test_mail_crash.py"
CRASH_TESTS = [
    "tests/integration/test_exec_security.py::"
    "test_commands_die_with_the_helper_and_a_restart_reuses_the_socket",
    "tests/integration/test_exec_security.py::test_exec_keeps_working_when_the_forker_dies",
    "tests/integration/test_exec.py::test_client_disconnect_kills_the_tree",
    "tests/integration/test_apache_jail.py::"
    "test_worker_killed_during_a_request_is_replaced_by_a_jailed_one",
    "tests/integration/test_gunicorn_privileged.py::"
    "test_master_stays_root_and_replaces_killed_workers_with_jailed_ones",
]
SELECTION = [ESCAPE, FAIL_CLOSED, SECCOMP, MAIL_CRASH, *CRASH_TESTS, LOAD]


class Collector:
    """pytest plugin: each test's outcome and recorded properties, by node id."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, object]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(
            report.nodeid, {"outcome": "passed", "properties": {}, "seconds": 0.0}
        )
        entry["seconds"] = round(float(entry["seconds"]) + report.duration, 2)  # type: ignore[arg-type]
        entry["properties"].update(dict(report.user_properties))  # type: ignore[attr-defined]
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"


def run(extra: list[str]) -> tuple[int, dict[str, dict]]:
    """Run the selection; return pytest's exit code and the collected results."""
    collector = Collector()
    code = pytest.main(
        ["-p", "no:cacheprovider", "-m", "not docker", *SELECTION, *extra],
        plugins=[collector],
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"exit_code": int(code), "at": time.time(), "tests": collector.tests}, indent=1)
    )
    return int(code), collector.tests


def _of(tests: dict[str, dict], prefix: str) -> dict[str, dict]:
    return {k: v for k, v in tests.items() if k.startswith(prefix)}


def _passed(tests: dict[str, dict]) -> str:
    ok = sum(1 for t in tests.values() if t["outcome"] == "passed")
    return f"{ok}/{len(tests)}" if tests else "not run"


def escape_table(tests: dict[str, dict]) -> list[str]:
    rows = [
        "| mode | syscall filter | attempts tried | blocked | tests passed |",
        "|---|---|---|---|---|",
    ]
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for nodeid, test in _of(tests, ESCAPE + "::test_escape_attempt[").items():
        variant = re.search(r"\[(\w+-(?:filter|nofilter))-", nodeid)
        if variant:
            by_variant[variant.group(1)].append(test)
    for variant, results in sorted(by_variant.items()):
        mode, filt = variant.split("-")
        measured = [t["properties"] for t in results if "blocked" in t["properties"]]
        blocked = sum(1 for p in measured if p["blocked"])
        passed = sum(1 for t in results if t["outcome"] == "passed")
        rows.append(
            f"| {mode} | {'on' if filt == 'filter' else 'off'} | {len(measured)} | {blocked} | "
            f"{passed}/{len(results)} |"
        )
    if not by_variant:
        rows.append("| (not run) | | | | |")
    return rows


def fuzz_table() -> list[str]:
    if not FUZZ_REPORT.exists():
        return ["Fuzzing: not run (make fuzz)."]
    data = json.loads(FUZZ_REPORT.read_text())
    targets = data.get("targets", data) if isinstance(data, dict) else {}
    rows = [
        "| fuzz target | executions | crashes | hangs | corpus | canary |",
        "|---|---|---|---|---|---|",
    ]
    totals = [0, 0, 0]
    for name, t in sorted(targets.items()):
        if not isinstance(t, dict) or "executions" not in t:
            continue
        for index, key in enumerate(("executions", "crashes", "hangs")):
            totals[index] += int(t.get(key) or 0)
        canary = "ok" if t.get("canary_ok") and not t.get("canary_failed") else "FAILED"
        rows.append(
            f"| {name} | {t['executions']} | {t.get('crashes', '?')} | {t.get('hangs', '?')} | "
            f"{t.get('corpus', '?')} | {canary} |"
        )
    rows.append(f"| **all targets** | {totals[0]} | {totals[1]} | {totals[2]} | | |")
    return rows


def fuzz_failed() -> bool:
    if not FUZZ_REPORT.exists():
        return False
    data = json.loads(FUZZ_REPORT.read_text())
    targets = data.get("targets", data) if isinstance(data, dict) else {}
    return any(
        isinstance(t, dict) and (t.get("crashes") or t.get("hangs") or t.get("canary_failed"))
        for t in targets.values()
    )


def crash_table(tests: dict[str, dict]) -> list[str]:
    rows = [
        "| kill -9 test | acknowledged before the kill | found after restart | lost | result |",
        "|---|---|---|---|---|",
    ]
    for nodeid, test in sorted(_of(tests, MAIL_CRASH).items()):
        p = test["properties"]
        name = nodeid.split("::", 1)[1]
        rows.append(
            f"| {name} | {p.get('acknowledged', '?')} | {p.get('found_after_restart', '?')} | "
            f"{p.get('lost', '?')} | {test['outcome']} |"
        )
    for prefix in CRASH_TESTS:
        for nodeid, test in sorted(_of(tests, prefix).items()):
            rows.append(f"| {nodeid.split('::', 1)[1]} | | | | {test['outcome']} |")
    return rows


def load_table(tests: dict[str, dict]) -> list[str]:
    rows = [
        "| load test | connections opened (peak open at once) | refused | closed by timeout | "
        "normal requests served | result |",
        "|---|---|---|---|---|---|",
    ]
    dns_rows = []
    for nodeid, test in sorted(_of(tests, LOAD).items()):
        p = test["properties"]
        name = nodeid.split("::", 1)[1]
        if "connections" in p:
            rows.append(
                f"| {name} | {p['connections']} ({p['peak_open']}) | {p['refused']} | "
                f"{p['closed_by_timeout']} | {p['normal_served']} | {test['outcome']} |"
            )
        elif "junk_sent" in p:
            dns_rows.append(
                f"| {name} | {p['junk_sent']} at {p['junk_rate']}/s | "
                f"{p['junk_dropped_or_formerr']} | {p['real_answered']}/{p['real_sent']} "
                f"({p['real_retries']} retries) | {test['outcome']} |"
            )
        else:
            rows.append(f"| {name} | | | | | {test['outcome']} |")
    if dns_rows:
        rows += [
            "",
            "| DNS flood | junk datagrams sent | counted dropped or FORMERR | real queries "
            "answered | result |",
            "|---|---|---|---|---|",
            *dns_rows,
        ]
    return rows


def render(code: int, tests: dict[str, dict]) -> str:
    failed = [k for k, t in tests.items() if t["outcome"] in ("failed", "error")]
    skipped = [k for k, t in tests.items() if t["outcome"] == "skipped"]
    lines = [
        "## Security report",
        "",
        "### Escape attempts from inside the jail",
        *escape_table(tests),
        "",
        f"Fail-closed cases passed: {_passed(_of(tests, FAIL_CLOSED))}; "
        f"syscall filter tests passed: {_passed(_of(tests, SECCOMP))}.",
        "",
        "### Fuzzing",
        *fuzz_table(),
        "",
        "### Crashes (kill -9)",
        *crash_table(tests),
        "",
        "### Load held",
        *load_table(tests),
        "",
        f"Tests: {len(tests)} run, {len(failed)} failed, {len(skipped)} skipped; "
        f"pytest exit code {code}; results in {RESULTS.relative_to(ROOT)}.",
    ]
    lines += [f"- FAILED: {name}" for name in failed]
    lines += [f"- SKIPPED: {name}" for name in skipped]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    code, tests = run(argv)
    print(render(code, tests))
    bad = code != 0 or any(t["outcome"] != "passed" for t in tests.values()) or fuzz_failed()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
