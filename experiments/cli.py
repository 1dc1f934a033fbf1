"""What every launcher shares: flags from the config dataclass, clean errors.

User mistakes (bad flag values, missing data, a policy that does not fit) end
the program with one line on stderr, `error: ...`, and exit code 2; no
traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging

USAGE_ERROR = 2


def fail(message: str) -> typing.NoReturn:
  """Prints one clean line and exits with code 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _field_help(cls: type) -> dict[str, str]:
  """Per-field help from the 'Attributes:' section of a dataclass docstring."""
  doc = cls.__doc__ or ""
  section = doc.split("Attributes:", 1)[-1]
  help_text: dict[str, list[str]] = {}
  current = None
  for line in section.splitlines():
    m = re.match(r"^\s{4}(\w+(?:, \w+)*): (.*)$", line)
    if m:
      current = m.group(1).split(", ")
      for name in current:
        help_text[name] = [m.group(2)]
    elif current and line.strip():
      for name in current:
        help_text[name].append(line.strip())
  return {k: " ".join(v) for k, v in help_text.items()}


def _base_type(tp: Any) -> type:
  if isinstance(tp, str):
    tp = eval(tp, {"bool": bool, "int": int, "float": float, "str": str})  # noqa: S307
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0]
  return tp


def define_flags_from(cls: type, *, skip: Sequence[str] = ()) -> list[str]:
  """Defines one absl flag per leaf field of a config dataclass.

  Same name (a nested config's fields by `haqjax.configs.flag_fields`),
  default and help (from the owning class's `Attributes:` docstring); tuple
  fields are comma-separated strings. Returns the flag names.
  """
  from haqjax import configs  # pylint: disable=g-import-not-at-top
  names = []
  for name, (path, tp, default) in configs.flag_fields(cls).items():
    if name in skip:
      continue
    owner = cls
    for part in path[:-1]:
      owner = configs.field_type(owner, part)
    help_text = _field_help(owner).get(path[-1], name)
    tp = _base_type(tp)
    if tp is bool:
      flags.DEFINE_bool(name, default, help_text)
    elif tp is int:
      flags.DEFINE_integer(name, default, help_text)
    elif tp is float:
      flags.DEFINE_float(name, default, help_text)
    elif configs.is_tuple_type(tp):
      flags.DEFINE_string(name, ",".join(map(str, default)), help_text)
    else:
      flags.DEFINE_string(name, default, help_text)
    names.append(name)
  return names


def values_of(names: Sequence[str]) -> dict[str, Any]:
  """The parsed values of flags `names`."""
  return {n: flags.FLAGS[n].value for n in names}


def config_from_flags(cls: type, names: Sequence[str]) -> Any:
  """The config `cls` that flags `names` (from `define_flags_from`) give."""
  from haqjax import configs  # pylint: disable=g-import-not-at-top
  return configs.from_flags(cls, values_of(names))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with clean one-line errors for user mistakes."""

  def guarded(argv):
    try:
      main(argv)
    except ValueError as e:
      fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except FileNotFoundError as e:
      fail(f"{e.filename or ''}: {e.strerror}")
    except KeyboardInterrupt:
      print("interrupted; rerun the same command to resume", file=sys.stderr)
      sys.exit(130)

  app.run(guarded, flags_parser=parse_flags)


def enable_compilation_cache(path: str | None) -> None:
  """Turns on JAX's persistent compilation cache (empty path: off).

  Programs that compiled in at least 0.5 s are kept, or in at least
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS where that is set (0 keeps every
  program: repeated short runs, such as tests, then read back even the quick
  compiles).
  """
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.5)))


class _DropOrbaxRecords(pylogging.Filter):
  """orbax logs every checkpoint step at INFO and unreadable files at ERROR;
  haqjax reports what matters itself (one line for a bad checkpoint)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return "orbax" not in record.pathname


def quiet_libraries() -> None:
  """Keeps the console to haqjax's own output: no tfds preparation progress
  bars, no orbax log lines, library INFO lines only with --verbosity."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_DropOrbaxRecords())
