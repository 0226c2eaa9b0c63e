"""The `jaxlm` command's process setting for glibc's malloc, applied before anything heavy is imported.

XLA:CPU allocates the buffers of every step afresh; with glibc's defaults each step then faults those pages in one
4 KiB page at a time (bench_peer_small: ~118,000 minor page faults and ~0.4 s of system time per step). With the
tunable glibc.malloc.hugetlb=1, malloc asks for transparent huge pages (madvise), and the same step faults a few
hundred times and runs 10-18% faster. glibc reads GLIBC_TUNABLES only when a process starts, so the command
re-executes itself once (os.execve: same process id, same arguments) with the tunable added. JAXLM_MALLOC_TUNABLES=0
leaves the environment as it is; a GLIBC_TUNABLES that already sets glibc.malloc.hugetlb is kept.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = TUNABLE + "=1"
OPT_OUT = "JAXLM_MALLOC_TUNABLES"


def glibc_version() -> tuple[int, ...]:
  """(2, 36) on glibc 2.36; () elsewhere (musl, macOS, Windows)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return ()
  return tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) if name == "glibc" else ()


def tuned_environment(environ, version: tuple[int, ...]) -> dict[str, str] | None:
  """The environment to re-execute with, or None when there is nothing to change: opted out, not glibc >= 2.35 (the
  first with the tunable), or the tunable already set (so a re-executed process never re-executes again)."""
  if environ.get(OPT_OUT, "1") == "0" or version < (2, 35):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE + "=" in current:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{current}:{SETTING}" if current else SETTING}


def reexec_with_tunables() -> None:
  """Replace this process by the same command line (interpreter options included) with the tunable set; returns when
  none is needed."""
  env = tuned_environment(os.environ, glibc_version())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
