"""`python -m minivlmamba.bench scan|generate|train|cpu-scan`: one sub-command per module of the package."""

import argparse

from minivlmamba import bench
from minivlmamba.bench import cpu_scan, generate, scan, train


def main():
    parser = argparse.ArgumentParser(prog="python -m minivlmamba.bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (scan, generate, train, cpu_scan):
        command.add_parser(sub)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
