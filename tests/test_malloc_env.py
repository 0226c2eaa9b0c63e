"""The jaxlm command's malloc setting: when it re-executes, with what environment, and that the re-executed process
gets the tunable and the same command line."""

import os
import subprocess
import sys

import pytest

from jaxlm import malloc_env


def test_the_tunable_is_added_once_and_kept_beside_others():
  env = malloc_env.tuned_environment({"PATH": "/bin"}, (2, 36))
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = malloc_env.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36))
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert malloc_env.tuned_environment(env, (2, 36)) is None  # the re-executed process does not re-execute


@pytest.mark.parametrize("environ, version", [
    ({"JAXLM_MALLOC_TUNABLES": "0"}, (2, 36)),  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36)),  # the user's own value stands
    ({}, (2, 34)),  # before glibc 2.35 the tunable does not exist
    ({}, ()),  # not glibc
])
def test_no_reexecution(environ, version):
  assert malloc_env.tuned_environment(environ, version) is None


@pytest.mark.skipif(malloc_env.glibc_version() < (2, 35), reason="needs glibc >= 2.35 (the tunable)")
def test_the_process_reexecutes_with_its_command_line_and_the_tunable():
  code = ("import os, sys; from jaxlm import malloc_env; print('start', flush=True); "
          "malloc_env.reexec_with_tunables(); print(os.getpid(), sys.argv[1:], os.environ['GLIBC_TUNABLES'])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLM_MALLOC_TUNABLES")}
  proc = subprocess.Popen([sys.executable, "-u", "-c", code, "a", "--b=1"], env=env, stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=60)
  lines = out.splitlines()
  assert lines[:2] == ["start", "start"]  # ran twice: before and after the exec
  assert lines[2] == f"{proc.pid} ['a', '--b=1'] glibc.malloc.hugetlb=1"  # same process, same arguments
