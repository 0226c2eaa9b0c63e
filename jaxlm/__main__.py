"""`python -m jaxlm` is the `jaxlm` command."""

from jaxlm.cli import main

if __name__ == "__main__":
  main()
