"""How a task describes its rows: the context its transformations see, and the kinds of step the generic pipeline
(jaxlm/data/pipeline.py) applies in order to (index, record) items. Plain data: importing it costs nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class RowContext:
  """What a task's row transformations may use: the tokenizer, the data.* keys, the split, the seed of its random
  transformations and this process's records of the split (MLM draws random next sentences from them)."""
  tokenizer: Any
  data_cfg: Any
  split: str
  seed: int
  documents: Sequence[dict]

  @property
  def train(self) -> bool:
    return self.split == "train"


# The steps a task describes its rows with, applied in order to (index, record) items.
@dataclasses.dataclass(frozen=True)
class Map:
  fn: Callable  # item -> item


@dataclasses.dataclass(frozen=True)
class RandomMap:
  fn: Callable  # (item, np.random.Generator) -> item; seeded by the context's seed and the item's position


@dataclasses.dataclass(frozen=True)
class FlatMap:
  fn: Any  # a grain FlatMapTransform: item -> list of items


@dataclasses.dataclass(frozen=True)
class Stream:
  fn: Callable  # grain.IterDataset -> grain.IterDataset (packing, concatenation)


def record(item):
  """(index, record) -> record: for rows that do not need their example's index."""
  return item[1]
