"""`python -m minivlmamba.bench scan|generate|train|cpu-scan`: one sub-command per module of the package."""

import torch

from minivlmamba import UserError, bench
from minivlmamba.bench import cpu_scan, generate, scan, train
from minivlmamba.cli import ArgumentParser, run


def main():
    parser = ArgumentParser(prog="python -m minivlmamba.bench", description=bench.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (scan, generate, train, cpu_scan):
        command.add_parser(sub)
    args = parser.parse_args()
    if args.command != "cpu-scan" and not torch.cuda.is_available():
        raise UserError(f"`{args.command}` times CUDA kernels, and this machine has no CUDA GPU (cpu-scan runs on "
                        "the CPU)")
    args.run(args)


if __name__ == "__main__":
    run(main)
