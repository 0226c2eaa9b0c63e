"""Experiment configs: base.py defines every key; each other file is one experiment. Installed with the package as
jaxlm.configs, so a config file kept anywhere can start from `from jaxlm.configs import base`."""
