"""What the command-line entry points share, so that every user mistake ends in one line, not a traceback:
a parser whose errors are one line and whose --help shows each number's allowed range, the number and
device types that check a flag, output paths checked before the work starts, and `run`, which turns a
UserError, a full disk, a lack of memory and Ctrl-C into a one-line message and a non-zero exit."""

import argparse
import errno
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from minivlmamba.config import UserError


def one_line(e: BaseException) -> str:
    """An exception as a message of one line: the first line of its text."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_text(text: str, where) -> str:
    """text, if it is valid Unicode: bytes that are not UTF-8 (in argv, on stdin) and JSON's lone surrogates are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: not valid UTF-8 text") from None
    return text


def decode(data: bytes, path) -> str:
    """A file's bytes as UTF-8 text, or a UserError naming the first line that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text") from None


class Number:
    """An argparse type: a finite int or float in [low, high] (`above`: strictly greater than it)."""

    def __init__(self, kind, low=None, high=None, above=None):
        self.kind, self.low, self.high, self.above = kind, low, high, above

    def __call__(self, text):
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (self.low is not None and value < self.low) or \
                (self.high is not None and value > self.high) or (self.above is not None and value <= self.above):
            raise argparse.ArgumentTypeError(f"{text!r} is not {self}")
        return value

    def __str__(self):
        name = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            bracket, low = ("[", self.low) if self.above is None else ("(", self.above)
            return f"{name} in {bracket}{low}, {self.high}]"
        return f"{name} > {self.above}" if self.above is not None else f"{name} >= {self.low}"


def device(text):
    """An argparse type: cpu, cuda, cuda:N, or auto (cuda if this machine has a GPU, else cpu)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(text)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda, cuda:N or auto")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPUs; "
                                         "use --device cpu")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Writes the allowed range of every Number flag after its help."""

    def _get_help_string(self, action):
        help = super()._get_help_string(action) or ""
        return f"{help} ({action.type})".lstrip() if isinstance(action.type, Number) else help


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad flag reported in one line (exit status 2, as argparse's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def output_file(path, flag) -> Path:
    """Check, before any work, that the file `flag` names can be written: its folder exists, it is no folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: no such folder {path.parent}; create it or give another path")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable; give another path")
    return path


def disk_full(error: BaseException, folder) -> bool:
    """Whether a write failed for lack of space: an OSError says so, safetensors' error quotes the OS, and
    torch.save says only "unexpected pos" (but leaves its partial file, so the disk is still full)."""
    return (getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
            or shutil.disk_usage(folder).free < 2**20)


def run(main, interrupted=lambda: None):
    """Run a script's main: a user's mistake, a full disk or too little memory ends in one line and exit
    status 1; Ctrl-C in interrupted()'s message (if any) and status 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # until here (imports) Ctrl-C just stops
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {one_line(e)}")
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: disk full writing {e.filename or 'a file'}; free some space and run again")
    except (MemoryError, torch.OutOfMemoryError) as e:
        sys.exit(f"error: out of memory ({one_line(e)}); use a smaller --batch-size")
    except KeyboardInterrupt:
        message = interrupted()
        if message:
            print(message, file=sys.stderr)
        sys.exit(130)
