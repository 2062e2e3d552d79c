"""`python -m minivlmamba.bench scan|generate|train`: one sub-command per module of the package."""

import argparse

from minivlmamba import bench
from minivlmamba.bench import generate, scan, train


def main():
    parser = argparse.ArgumentParser(prog="python -m minivlmamba.bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (scan, generate, train):
        command.add_parser(sub)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
