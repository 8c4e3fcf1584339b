"""What every command does with its command line and its errors.

A user error ends a command with one line on stderr,

    error: <what was wrong> (<the value>); <what to do>

and exit code 2, with no traceback: a wrong path, an unknown config key, a workdir that
would be overwritten. Tracebacks are for bugs; `--debug` (or EGRC_DEBUG=1) shows them for
user errors too. `Parser` is an argparse parser whose own errors (a missing or malformed
flag) follow the same one-line rule.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
      sys.exit(cli.run(main))
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
  """Something the user gave is wrong (a path, a value, a workdir); the message says what and
  what to do. Raised by our own checks; the usual built-in kinds count too (USER_ERRORS)."""


# Exceptions that report bad input. Our checks raise these with messages written for users;
# anything else (TypeError, RuntimeError from XLA, ...) is a bug and keeps its traceback.
USER_ERRORS = (
  UserError,
  ValueError,
  KeyError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)


def one_line(e: BaseException) -> str:
  """The exception's message on one line (KeyError's str() adds quotes: use its argument)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  text = " ".join(str(text).split())
  return text or type(e).__name__


def debug_requested(argv: Sequence[str]) -> bool:
  return "--debug" in argv or os.environ.get("EGRC_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
  """Call `main(argv)` (argv without `--debug`) and turn a user error into one line and
  exit code 2. Returns the exit code: main's own when it returns an int, else 0."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # Only this command's own flags: after "--" come another command's (launch/local.sh).
  own = argv[: argv.index("--")] if "--" in argv else argv
  debug = debug_requested(own)
  argv = [a for a in own if a != "--debug"] + argv[len(own) :]
  try:
    rc = main(argv)
    return rc if isinstance(rc, int) else 0
  except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its line already printed)
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    raise
  except USER_ERRORS as e:
    if debug:
      raise
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 2


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`error: ...; see --help`, exit 2) and a `--debug` flag
  listed in the help (`run` consumes it before parsing)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)
    # `run` takes --debug out of argv before parsing; it is listed here for --help only and
    # never lands in the namespace (default SUPPRESS).
    self.add_argument(
      "--debug",
      action="store_true",
      default=argparse.SUPPRESS,
      help="show Python tracebacks for user errors too",
    )

  def error(self, message: str):
    print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
    raise SystemExit(2)
