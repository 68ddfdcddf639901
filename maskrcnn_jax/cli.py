"""What the command-line entry points (train, evaluate, predict, convert) share: the error contract.

`run(main)` stands in for `absl.app.run(main)`. Bad input is printed as one line
`error: <message>` on stderr and the process exits with status 2, no traceback:

* an `errors.UserError` raised anywhere (a bad checkpoint, an unsafe pickle, a corrupt image,
  bad annotations, a config value that is not allowed, a missing path; a diverged training run
  exits with 3, `trainer.NonFiniteLossError`);
* a command line absl cannot parse (unknown flag, missing required flag, bad flag value) or a
  typo in a `--config.x.y=v` override (ml_collections raises while the flags are parsed);
* a `--config` file that does not exist or does not load (ml_collections defers that error to
  the config's first use; `run` surfaces it before `main` starts);
* `absl.app.UsageError` (e.g. predict without images).

Anything else is a bug and keeps its traceback. `--verbose` shows the traceback of bad input too.
orbax's INFO logging is dropped (`quiet_library_logs`) so that stderr holds what matters.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from maskrcnn_jax import errors

MAX_CHARS = 600  # of an error line; --verbose prints the whole message with its traceback


def one_line(error: BaseException) -> str:
  """`error`'s message as one line.

  ml_collections reports a config typo as a KeyError whose message is a repr with a "Did you
  mean" line (wrapped in an AttributeError), and an exception in a config file's get_config() as
  a message holding the traceback; both are reduced to their text. Multi-line messages are joined
  and cut at MAX_CHARS characters.
  """
  while isinstance(error, AttributeError) and error.args and isinstance(error.args[0],
                                                                         BaseException):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  else:
    text = str(error) or type(error).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]  # the exception line of a traceback quoted in the message
  text = " ".join(lines)
  if len(text) > MAX_CHARS:  # e.g. a name-map mismatch listing hundreds of keys
    text = text[:MAX_CHARS].rstrip() + " ... (--verbose prints all of it)"
  return text


class _DropInfoFrom(logging.Filter):
  """Drops INFO-and-below records logged from files under the given package folders."""

  def __init__(self, *folders: str):
    super().__init__()
    self.folders = tuple(os.sep + f + os.sep for f in folders)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or not any(f in record.pathname for f in self.folders)


def quiet_library_logs() -> None:
  """Hides orbax's INFO lines (dozens per checkpoint save or restore) from the CLIs' stderr."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropInfoFrom) for f in handler.filters):
    handler.addFilter(_DropInfoFrom("orbax", "etils"))


def _fail(message: str, exit_code: int = 2, verbose: bool = False) -> NoReturn:
  if verbose:
    traceback.print_exc()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def _check_configs_loaded() -> None:
  """A --config file that failed to load: ml_collections keeps the error until the first use."""
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    if flag.flag_type() != "config object" or flag.value is None:  # DEFINE_config_file's flags
      continue
    try:
      flag.value.get("model", None)
    except IOError as e:  # ml_collections' stand-in config raises this on every access
      raise errors.ConfigError(f"--{name} {config_flags.get_config_filename(flag)}: "
                               f"{one_line(e.__cause__ or e)}") from e


def _override_in(argv: Sequence[str], message: str) -> str:
  """The --config.x.y argument that a KeyError message ('key' ...) is about, if one matches."""
  key = message.split("'")[1] if message.count("'") >= 2 else None
  for arg in argv[1:]:
    head = arg.split("=", 1)[0]
    if key and head.startswith("--") and "." in head and head.rsplit(".", 1)[-1] == key:
      return head
  return ""


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """Runs an absl `main(argv)` under the error contract above (defines --verbose)."""
  verbose = flags.DEFINE_bool("verbose", False,
                              "Show the traceback of errors in the input (paths, files, config).")

  def parse(args):
    try:
      remaining = flags.FLAGS(args)
    except errors.UserError as e:
      _fail(one_line(e), e.exit_code, "--verbose" in args)
    except flags.Error as e:
      _fail(f"{one_line(e)} (--help lists the flags)", 2, "--verbose" in args)
    except Exception as e:  # pylint: disable=broad-except
      # Config overrides are applied while parsing: a typo in --config.x.y is a KeyError /
      # AttributeError from ml_collections, a bad value a TypeError / ValueError.
      message = one_line(e)
      where = _override_in(args, message)
      if where:
        message = f"{where}: no such config field {message}"
      _fail(message, 2, "--verbose" in args)
    try:
      _check_configs_loaded()
    except errors.ConfigError as e:
      _fail(one_line(e), e.exit_code, "--verbose" in args)
    return remaining

  def guarded(args):
    quiet_library_logs()
    try:
      return main(args)
    except errors.UserError as e:
      _fail(one_line(e), e.exit_code, verbose.value)
    except app.UsageError as e:
      _fail(f"{one_line(e)} (--help lists the flags)", 2, verbose.value)

  app.run(guarded, argv=list(argv) if argv is not None else None, flags_parser=parse)
