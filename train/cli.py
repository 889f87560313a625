"""What the command-line tools share: an absl flags_parser for a module with flags of its own."""

from __future__ import annotations

import sys

from absl import app

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def flags_parser(name: str, prog: str, doc: str | None, flag_values, parse):
  """flags_parser for `app.run`: -h / --help prints the module doc and its flags (exit 0);
  a usage error from parse(argv) is one line naming `name` (exit 2)."""
  def _parse(argv: list[str]) -> list[str]:
    if any(a in HELP for a in argv[1:]):
      print((doc or "").strip() + "\n\nflags:\n" + flag_values.get_help())
      sys.exit(0)
    try:
      return parse(argv)
    except app.UsageError as e:
      print(f"{name}: error: {e}  ({prog} --helpshort lists the flags)", file=sys.stderr)
      sys.exit(2)
  return _parse
