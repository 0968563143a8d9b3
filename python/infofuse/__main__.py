"""``python -m infofuse <command>`` (also the ``infofuse`` console script).

Commands:
    bench    time, peak memory and accuracy of infofuse's ops beside their peers (``bench --help``)
"""

from __future__ import annotations

import sys

_USAGE = """usage: python -m infofuse <command> [options]

commands:
  bench    time, peak memory and accuracy of infofuse's ops beside their peers
           (python -m infofuse bench --help)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    if command == "bench":
        from infofuse.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"infofuse: unknown command {command!r}\n\n{_USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
