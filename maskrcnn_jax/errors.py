"""The project's own error classes: an error in what the user gave, not a bug.

Every error that bad input can cause -- a checkpoint that is corrupt, unsafe or for another
model, an image that does not decode, an annotation file that is not valid COCO, a config value
that is not allowed, a path that does not exist -- derives from `UserError`. The command-line
entry points (`maskrcnn_jax/cli.py`) print its message as one line on stderr and exit with its
`exit_code` (2), without a traceback; anything else is a bug and keeps its traceback.

Each subclass also derives from the builtin a caller would catch without knowing this module
(`ValueError`, `FileNotFoundError`, ...). This module imports nothing, so that every layer (ops,
modeling, data, checkpoints, training, evaluation) can raise these.
"""
from __future__ import annotations


class UserError(Exception):
  """Bad input; the message names the file / value and what is wrong with it, in one line."""
  exit_code = 2


class ConfigError(UserError, ValueError):
  """A config value (recipe file, --config.x.y override or CLI flag) that is not allowed."""


class InputNotFoundError(UserError, FileNotFoundError):
  """A path the user gave (config file, annotation json, image folder, checkpoint) is missing."""


class MissingDependencyError(UserError, ImportError):
  """A package a requested feature needs is not installed; the message names it and the pip
  command that installs it."""


class CheckpointError(UserError):
  """A checkpoint that cannot be read, is unsafe to unpickle, or does not fit the config's model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint path holds no checkpoint; the message lists what was looked for."""


class CheckpointContentError(CheckpointError, ValueError):
  """A checkpoint that was read but does not fit: other shapes, conflicting recorded constants."""
