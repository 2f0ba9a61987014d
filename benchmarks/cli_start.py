"""How fast the CLI answers: `pipelines --help`, every command's `--help` and `pipelines version`, whole process.

    .venv/bin/python benchmarks/cli_start.py [--runs 5] [--pipelines .venv/bin/pipelines]

Runs each command `--runs` times through the installed entry script (what a user types), output to /dev/null,
alternating the commands so that a burst of load elsewhere touches them all alike, and prints a markdown table of
the median, fastest and slowest wall time of each, with the 1-minute load average before and after (on a shared
machine other work inflates the times: this box has 2 cores). The goal (issue 20) is under 1 s for every one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.0


def commands() -> list[list[str]]:
    """`--help` of the CLI and of each of its commands and groups, and `version`."""
    sys.path.insert(0, str(ROOT))
    from pipelines.cli import app

    def walk(command: object, words: list[str]) -> list[list[str]]:
        found = [[*words, "--help"]]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, [*words, name])
        return found

    return walk(typer.main.get_command(app), []) + [["version"]]


def wall_s(pipelines: str, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([pipelines, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="Runs of each command (the median is reported).")
    parser.add_argument("--pipelines", default=str(Path(sys.executable).with_name("pipelines")),
                        help="The entry script to time.")
    args = parser.parse_args()

    todo = commands()
    load_before = os.getloadavg()[0]
    wall_s(args.pipelines, ["version"])  # one untimed run: the first reads the files from disk
    times: dict[str, list[float]] = {" ".join(words): [] for words in todo}
    for _ in range(args.runs):
        for words in todo:
            times[" ".join(words)].append(wall_s(args.pipelines, words))
    load_after = os.getloadavg()[0]

    print(f"`pipelines ...`, whole process, {args.runs} runs each; load average {load_before:.2f} before, "
          f"{load_after:.2f} after\n")
    print("| command | median | fastest | slowest |")
    print("|---|---:|---:|---:|")
    for command, walls in times.items():
        print(f"| `pipelines {command}` | {statistics.median(walls) * 1000:.0f} ms | {min(walls) * 1000:.0f} ms "
              f"| {max(walls) * 1000:.0f} ms |")
    slowest = max(times, key=lambda c: statistics.median(times[c]))
    worst = statistics.median(times[slowest])
    verdict = "meets" if worst < GOAL_S else "misses"
    print(f"\nslowest median: `pipelines {slowest}` {worst * 1000:.0f} ms ({verdict} the {GOAL_S:.0f} s goal)")


if __name__ == "__main__":
    main()
