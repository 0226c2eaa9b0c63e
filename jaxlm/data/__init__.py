"""The input pipeline: document sources, tokenizers, transformations (packing, masking, alignment) and the
per-process batch iterators built on grain."""
