"""`python -m jaxlm` is the `jaxlm` command (the console script runs main() here too).

The process first gets its malloc setting (jaxlm/malloc_env.py), which may re-execute it, so jaxlm.cli and the jax
stack it imports are imported only after that.
"""

import importlib

from jaxlm import malloc_env


def main():
  malloc_env.reexec_with_tunables()
  return importlib.import_module("jaxlm.cli").main()


if __name__ == "__main__":
  main()
