"""Files read straight out of tar archives, member by member, never extracted to disk.

Shared by data/text.py (the aclImdb tarball of LRA Text) and data/lm.py (an archive of
documents). tarfile's "r:*" opens plain, gzip, bz2 and xz archives; the members are
streamed in archive order, and only the regular files a caller selects are read.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

from data.integrity import READ_ERRORS, DataError

# Names of the files read as archives (data/lm.py decides a path is one by its name).
SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_archive(path) -> bool:
  """Whether path names a tar archive by its suffix (SUFFIXES)."""
  return Path(path).name.lower().endswith(SUFFIXES)


def read_members(path, select: Callable[[str], bool], *, names_only: bool = False,
                 what: str = "", hint: str = "") -> list[tuple[str, bytes | None]]:
  """(member name, its bytes) of every regular member whose name `select` accepts.

  In archive order; with names_only the bytes are None (the archive is still read
  through, since a compressed tar has no index).

  Raises:
    DataError: the archive is unreadable, truncated or not a tar archive; the
      message is `what` + path + the cause + `hint`, one line.
  """
  out = []
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        if member.isfile() and select(member.name):
          out.append((member.name, None if names_only else tar.extractfile(member).read()))
  except (*READ_ERRORS, tarfile.TarError) as e:
    cause = " ".join(str(e).split())[:300]  # tarfile's "r:*" error lists every method tried
    raise DataError(f"{what}{path}: the archive is damaged or truncated, or not a readable tar "
                    f"archive ({type(e).__name__}: {cause}){hint}") from None
  return out
