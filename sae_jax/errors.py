"""One exception type for every user-facing input error.

Each message is one line naming the file, field or flag and what was expected, so the mains in
`experiments/` can print it instead of a traceback.
"""


class SaeJaxError(ValueError):
  """Bad input: a file, field or flag that does not match what the run expects."""
