"""Errors raised by the data layer for user-fixable problems.

Both are `ValueError`s whose message is one line, so that an entry point can
print it as is and exit non-zero.
"""


class DataNotFoundError(ValueError):
  """The dataset is not prepared and its source files are nowhere we looked.

  The message names the dataset, every place that was searched, and the exact
  command or download that provides the files.
  """


class CorruptDataError(ValueError):
  """A source file exists but cannot be parsed (truncated, wrong format, ...).

  The message names the file and what is wrong with it.
  """
