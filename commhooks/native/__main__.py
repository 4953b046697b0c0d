"""``python -m commhooks.native build``: build the kernels into the cache now (for example in a
job's setup step, before the ranks start) and print the library's path; ``info`` prints the
path and the CPU level this machine binds, or why the kernels are unavailable."""

from __future__ import annotations

import argparse
import sys

from commhooks import native


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commhooks.native", description=__doc__)
    parser.add_argument("command", choices=["build", "info"])
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            print(native.build())
        except (OSError, RuntimeError) as e:
            print(f"native kernels: build failed: {e}", file=sys.stderr)
            return 1
        return 0
    kernels = native.lib()
    if kernels is None:
        print(f"unavailable: {native.unavailable_reason()}")
        return 1
    print(f"{kernels.path} (level {kernels.level})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
