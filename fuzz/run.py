"""``make fuzz``: atheris on each target for a bounded time, then a live replay with a canary.

For each target in :data:`fuzz.TARGETS` a child process (``python -m fuzz.run --child NAME``)
runs libFuzzer through atheris for ``--seconds`` (``FUZZ_SECONDS``, default 60) with
``-timeout=1``: an input that raises is a *crash*, one that runs over a second a *hang*; libFuzzer
saves either under ``fuzz/crashes/<target>/`` (commit it once the bug is fixed: the normal suite
replays that directory) and stops; the runner restarts it for the rest of the time.  Its
output is in ``build/fuzz/<target>.log``.  The seeds in ``fuzz/corpus/<target>/`` are read, new
inputs go to ``build/fuzz/corpus/<target>/`` (kept between runs, not committed).

Then a real ``chroot-helper serve`` is started (:mod:`fuzz.live`) and each target's inputs
(seeds, working corpus up to ``--replay-limit``, crashes) are sent to it from several
connections while :mod:`fuzz.canary` does real exec, SMTP and DNS requests.  Any crash, hang,
connection left hanging, canary failure, acknowledged canary message missing from the spool,
or a dead helper makes the exit status 1.

The summary is printed and written as JSON to ``--report`` (``build/fuzz-report.json``)::

    {
      "version": 1,
      "ok": bool,                       # false on any failure below
      "seconds_per_target": float,
      "helper_alive": bool,             # the daemon was still running after every replay
      "targets": {
        "<name>": {
          "executions": int,            # inputs libFuzzer ran (0 with --replay-only)
          "crashes": int,               # new crash-*/oom-* files this run
          "hangs": int,                 # new timeout-* files this run
          "artifacts": [str],           # their paths, relative to the checkout
          "corpus": int,                # seeds + working corpus files after the run
          "replayed": int,              # inputs sent to the live helper
          "replay_hangs": int,          # connections it neither answered nor closed in 5 s
          "canary_ok": int,             # canary requests that succeeded during the replay
          "canary_failed": int,
          "canary_errors": [str],       # the first few failures
          "lost": [str]                 # canary queue IDs acknowledged but not in the spool
        }
      }
    }

Run from the checkout: ``python -m fuzz.run [--seconds N] [--replay-only] [TARGET ...]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import SCRATCH_ENV, SCRATCH_PARENT, TARGETS

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"
WORK = ROOT / "build" / "fuzz" / "corpus"
REPORT = ROOT / "build" / "fuzz-report.json"
INPUT_TIMEOUT = 1
MAX_RESTARTS = 5
"""Seconds one input may take before libFuzzer calls it a hang."""
_EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)|Done (\d+) runs|#(\d+)\s")
_CRASH_PREFIXES = ("crash-", "oom-", "leak-")


def inputs_of(target: str) -> list[Path]:
    """Every saved input of *target*: seeds, then crashes (what the normal suite replays)."""
    found: list[Path] = []
    for directory in (SEEDS / target, CRASHES / target):
        if directory.is_dir():
            found += sorted(p for p in directory.iterdir() if p.is_file() and p.name[0] != ".")
    return found


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the fuzzing process: instrument our code and the parsers we feed, then fuzz."""
    import atheris

    logging.getLogger().addHandler(logging.NullHandler())  # targets watch for tracebacks
    with atheris.instrument_imports(include=["chroot_helper", "aiosmtpd", "dns", "fuzz"]):
        module = importlib.import_module(TARGETS[target])
    atheris.Setup([sys.argv[0], *libfuzzer_args], module.test_one_input)
    atheris.Fuzz()


def _executions(output: bytes) -> int:
    best = 0
    for match in _EXECUTED.finditer(output):
        best = max(best, *(int(g) for g in match.groups() if g))
    return best


def _fuzz_once(target: str, seconds: float, log: Path) -> tuple[int, int]:
    """One libFuzzer run (it stops at its first finding): (executions, exit status)."""
    crashes = CRASHES / target
    args = [
        f"-max_total_time={max(1, int(seconds))}",
        f"-timeout={INPUT_TIMEOUT}",
        "-rss_limit_mb=2048",
        "-max_len=8192",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/",
        str(WORK / target),
        str(SEEDS / target),
    ]
    # libFuzzer leaves without running atexit handlers on a finding: scratch files go into a
    # directory removed here.
    scratch = tempfile.mkdtemp(prefix="chrootwsgi-fuzz-", dir=SCRATCH_PARENT)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fuzz.run", "--child", target, *args],
            cwd=ROOT,
            env={**os.environ, SCRATCH_ENV: scratch},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=seconds + 120,
            check=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with log.open("ab") as out:
        out.write(done.stdout)
    return _executions(done.stdout), done.returncode


def fuzz_target(target: str, seconds: float) -> dict[str, object]:
    """Run atheris on *target* for *seconds*, restarting it after each finding (at most
    :data:`MAX_RESTARTS` times); count executions and new artifacts."""
    (WORK / target).mkdir(parents=True, exist_ok=True)
    crashes = CRASHES / target
    crashes.mkdir(parents=True, exist_ok=True)
    log = ROOT / "build" / "fuzz" / f"{target}.log"
    log.unlink(missing_ok=True)
    before = set(crashes.iterdir())
    executions, died = 0, False
    deadline = time.monotonic() + seconds
    for _ in range(MAX_RESTARTS + 1):
        found = set(crashes.iterdir())
        ran, status = _fuzz_once(target, max(1.0, deadline - time.monotonic()), log)
        executions += ran
        if set(crashes.iterdir()) == found:
            died = status != 0  # no artifact: a clean end, or a death libFuzzer did not see
            break
        if deadline - time.monotonic() < 2:
            break
    new = sorted(set(crashes.iterdir()) - before)
    hangs = [p for p in new if p.name.startswith("timeout-")]
    crashed = [p for p in new if p.name.startswith(_CRASH_PREFIXES)]
    if died:
        crashed.append(log)
    return {
        "executions": executions,
        "crashes": len(crashed),
        "hangs": len(hangs),
        "artifacts": [str(p.relative_to(ROOT)) for p in crashed + hangs],
    }


def _replay_inputs(target: str, limit: int) -> list[Path]:
    work = WORK / target
    found = sorted(work.iterdir(), key=lambda p: p.stat().st_mtime) if work.is_dir() else []
    return inputs_of(target) + found[-limit:]


def _summary(name: str, row: dict[str, object]) -> str:
    return (
        f"{name:7} executions={row['executions']} crashes={row['crashes']} hangs={row['hangs']} "
        f"corpus={row['corpus']} replayed={row['replayed']} replay_hangs={row['replay_hangs']} "
        f"canary ok={row['canary_ok']} failed={row['canary_failed']} lost={len(row['lost'])}"  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # python -m fuzz.run --child TARGET LIBFUZZER_ARGS...
        _child(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60"))
    )
    parser.add_argument("--replay-only", action="store_true", help="skip the atheris runs")
    parser.add_argument("--replay-limit", type=int, default=1000)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    from .live import live_helper, replay

    targets = args.targets or list(TARGETS)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    rows: dict[str, dict[str, object]] = {}
    for name in targets:
        print(f"fuzzing {name} for {args.seconds:g} s", flush=True)
        if args.replay_only:
            rows[name] = {"executions": 0, "crashes": 0, "hangs": 0, "artifacts": []}
        else:
            rows[name] = fuzz_target(name, args.seconds)
    alive = True
    with live_helper() as helper:
        for name in targets:
            inputs = _replay_inputs(name, args.replay_limit)
            print(f"replaying {len(inputs)} {name} inputs against {helper.base}", flush=True)
            result = asdict(replay(helper, name, inputs))
            rows[name].update(
                corpus=len(inputs_of(name)) + len(list((WORK / name).glob("*"))),
                replayed=result.pop("inputs"),
                replay_hangs=result.pop("hangs"),
                **result,
            )
            alive = alive and helper.alive()
    ok = alive and all(
        not (r["crashes"] or r["hangs"] or r["replay_hangs"] or r["canary_failed"] or r["lost"])
        for r in rows.values()
    )
    for name, row in rows.items():
        print(_summary(name, row))
    print(f"helper alive: {alive}; {'OK' if ok else 'FAILED'}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "version": 1,
        "ok": ok,
        "seconds_per_target": 0 if args.replay_only else args.seconds,
        "helper_alive": alive,
        "targets": rows,
    }
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
