"""Which errors the command lines report in one line, and that line.

An error is reported in one line (its message already names the field, file or folder and
what to do) when it is:
  * one the trainer raises about the run itself: a changed config, a locked workdir,
    an unusable checkpoint, a non-finite loss;
  * a ValueError, TypeError, OSError or RuntimeError raised by a `raise` statement in this
    repository (config, data and argument validation), not from inside a library;
  * an OSError from the system that names its file (a permission, a missing file), or
    a full disk found anywhere in the exception's chain (a save that failed in orbax's
    threads still comes out as "No space left on device: <file>");
  * KeyboardInterrupt (a second Ctrl-C, or one before training started).
Anything else is a bug and keeps its full traceback, as does every error with --verbose.
"""

from __future__ import annotations

import errno
import linecache
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORTED = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError)
_NO_SPACE = re.compile(r"no space left on device", re.IGNORECASE)


def _chain(error: BaseException):
  """error, its causes and contexts, and the members of exception groups, once each."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _raised_here(error: BaseException) -> bool:
  """Whether the innermost frame is a `raise` statement in this repository's code."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  if not path.startswith(REPO + os.sep) or "site-packages" in path:
    return False
  return linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise")


def _system_error(error: BaseException) -> str | None:
  """"<strerror>: <file>" of a system error; a full disk anywhere in the chain."""
  if isinstance(error, OSError) and error.errno is not None and error.filename:
    return f"{error.strerror}: {error.filename}"
  for e in _chain(error):
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _NO_SPACE.search(str(e)[:2000]):
      where = getattr(e, "filename", None) or re.search(r"(/[^\s'\"]+)", str(e))
      where = where if isinstance(where, str) or where is None else where.group(1)
      return "No space left on device" + (f": {where}" if where else "")
  return None


def one_line(error: BaseException, run_errors: tuple = ()) -> str | None:
  """The one-line report of `error`, or None when its traceback should be printed.

  run_errors: the exception classes the caller reports by message alone.
  """
  if isinstance(error, KeyboardInterrupt):
    return f"interrupted ({error})" if str(error) else "interrupted"
  if isinstance(error, run_errors) or (isinstance(error, _REPORTED) and _raised_here(error)):
    return " ".join(str(error).split())
  return _system_error(error)
