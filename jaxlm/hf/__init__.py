"""Hugging Face formats <-> jaxlm parameter trees, one module per family. Nothing here depends on the training loop:
a family module reads config.json and safetensors into a model config and a parameter tree, and writes them back."""
