"""What each config key accepts, declared beside the key in configs/base.py (`CHECKS["train.steps"] = at_least(1)`);
the same object checks a value and words the error, so the rule and its message cannot drift apart.

jaxlm/config.py runs the checks once a config is loaded and overridden, before any work. A check sees one key's
value; rules across keys (the mesh, the head a task has, data.seq_len against model.max_len) stay with the code that
builds from them, which also runs before any work.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable


class Check:
  """One key's rule. `expected` says in words what the key accepts; it ends every error about the key."""

  expected: str = ""

  def accepts(self, value) -> bool:
    raise NotImplementedError

  def error(self, value) -> str | None:
    """None when `value` is accepted, else what is wrong with it (the caller prefixes the key and the value)."""
    return None if self.accepts(value) else f"expected {self.expected}"

  def or_(self, *values) -> Check:
    """This rule, or exactly one of `values` (e.g. mesh.data: at_least(1).or_(-1), where -1 means 'the rest')."""
    return _Either(self, values)


class _Free(Check):
  expected = "anything (free-form: a name, a path, a glob, a prompt)"

  def accepts(self, value) -> bool:
    return True


FREE = _Free()  # explicitly unchecked beyond its type: names, paths, globs, prompts


class _OneOf(Check):
  def __init__(self, values: tuple, known: Callable[[], Iterable] | None = None, what: str = ""):
    self._values, self._known, self._what = values, known, what

  def values(self) -> tuple:
    return tuple(self._known()) if self._known is not None else self._values

  @property
  def expected(self) -> str:
    listed = ", ".join(repr(v) for v in self.values())
    return f"{self._what} ({listed})" if self._what else f"one of {listed}"

  def accepts(self, value) -> bool:
    return value in self.values()


def one_of(*values) -> Check:
  """An enumeration: the value must be one of `values`."""
  return _OneOf(values)


def _known_tasks() -> tuple[str, ...]:
  # imported when checked: configs/base.py stays importable without jax, and the registry is the one of this moment
  return tuple(importlib.import_module("jaxlm.tasks").known_tasks())


def _known_sources() -> tuple[str, ...]:
  # imported when checked (see _known_tasks); every task's record kind says which data.source values provide it
  tasks = importlib.import_module("jaxlm.tasks")
  found = []
  for name in tasks.known_tasks():
    for source in tasks.task_class(name).kind.sources():
      if source and source not in found:
        found.append(source)
  return tuple(found)


def registered_task() -> Check:
  """task.name: a module of jaxlm/tasks/ (or a task registered with jaxlm.tasks.register)."""
  return _OneOf((), _known_tasks, "a task of jaxlm/tasks/")


def data_source() -> Check:
  """data.source: a value some task's record kind reads (which one fits the task is checked when the data opens)."""
  return _OneOf((), _known_sources, "a source some task reads")


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Range(Check):
  def __init__(self, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
    self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

  @property
  def expected(self) -> str:
    if self.hi is None:
      return f"a number {'>' if self.lo_open else '>='} {self.lo}"
    if self.lo is None:
      return f"a number {'<' if self.hi_open else '<='} {self.hi}"
    return f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

  def accepts(self, value) -> bool:
    if not _number(value):
      return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


def at_least(lo) -> Check:
  """A finite number >= lo (counts, sizes, steps: at_least(1); 'N, 0 = off': at_least(0))."""
  return _Range(lo)


def positive() -> Check:
  """A finite number > 0 (epsilons, scales, temperatures of a distribution)."""
  return _Range(0, lo_open=True)


def between(lo, hi, *, lo_open: bool = False, hi_open: bool = False) -> Check:
  """A finite number in [lo, hi]; either end excluded with lo_open / hi_open."""
  return _Range(lo, hi, lo_open, hi_open)


def probability() -> Check:
  """A share or probability: [0, 1]."""
  return _Range(0, 1)


def rate() -> Check:
  """A dropout rate: [0, 1) (a rate of 1 drops everything)."""
  return _Range(0, 1, hi_open=True)


class _Satisfies(Check):
  def __init__(self, predicate: Callable[[object], bool], expected: str):
    self._predicate, self.expected = predicate, expected

  def accepts(self, value) -> bool:
    try:
      return bool(self._predicate(value))
    except (TypeError, ValueError, AttributeError, IndexError):  # a value of another shape than the rule reads
      return False


def satisfies(predicate: Callable[[object], bool], expected: str) -> Check:
  """Any rule on one value: `predicate(value)` must be true; `expected` words it for the error."""
  return _Satisfies(predicate, expected)


def non_empty() -> Check:
  """A string that is not empty (a field or column name)."""
  return _Satisfies(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


class _Each(Check):
  def __init__(self, inner: Check):
    self.inner = inner

  @property
  def expected(self) -> str:
    return f"a list whose every item is {self.inner.expected.removeprefix('a ').removeprefix('an ')}"

  def accepts(self, value) -> bool:
    return isinstance(value, (tuple, list)) and all(self.inner.accepts(v) for v in value)

  def error(self, value) -> str | None:
    if not isinstance(value, (tuple, list)):
      return f"expected {self.expected}"
    for i, item in enumerate(value):
      if not self.inner.accepts(item):
        return f"item {i} ({item!r}): expected {self.inner.expected}"
    return None


def each(inner: Check) -> Check:
  """A tuple (or list) whose every item passes `inner`."""
  return _Each(inner)


class _Either(Check):
  def __init__(self, rule: Check, values: tuple):
    self.rule, self.values = rule, values

  @property
  def expected(self) -> str:
    return f"{self.rule.expected}, or {' or '.join(repr(v) for v in self.values)}"

  def accepts(self, value) -> bool:
    return any(value == v and type(value) is type(v) for v in self.values) or self.rule.accepts(value)
