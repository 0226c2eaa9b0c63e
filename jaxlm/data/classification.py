"""Sequence and sentence-pair classification examples: [CLS] text_a [SEP] (text_b [SEP]) with an integer label."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jaxlm.data import encoder_inputs
from jaxlm.data.example_packing import Layout


@dataclasses.dataclass
class EncodeClassification(grain.transforms.Map):
  """An (example id, {'text_a', 'text_b', 'label'}) pair -> encoder inputs + labels [] + example_weights [] +
  example_ids []."""
  tokenizer: object
  seq_len: int
  label_ids: dict

  def map(self, item) -> dict[str, np.ndarray]:
    index, record = item
    a = self.tokenizer.encode(record["text_a"])
    b = self.tokenizer.encode(record["text_b"]) if record["text_b"] else None
    a, b = encoder_inputs.truncate_pair(a, b, self.seq_len - (3 if b is not None else 2))
    out = encoder_inputs.encode_pair(a, b, self.seq_len, self.tokenizer)
    out["labels"] = np.int32(self.label_ids[record["label"]])
    out["example_weights"] = np.float32(1.0)
    out["example_ids"] = np.int32(index)
    return out


# Filler rows of an eval batch: no example.
PAD_VALUES = {"example_ids": -1}
# EncodeClassification's rows for data.pack_examples
LAYOUT = Layout(token_keys=("input_ids", "token_type_ids", "attention_mask"),
                example_keys=("labels", "example_weights", "example_ids"))
