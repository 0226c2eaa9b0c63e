"""The SemEval-2010 Task 8 scorer (semeval2010_task8_scorer-v1.2.pl) in Python: its three evaluations, computed as
the Perl code computes them, with the official score (macro-F1 over the relations, direction counted, Other left out),
a readable text report, and answer files in the scorer's 'ID<TAB>label' format."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

_DIRECTION = re.compile(r"\(e[12],e[12]\)$")
_SORTS_OTHER_AS = "_Other"  # the Perl scorer renames Other so, which places it after the capitalised relation names

# The scorer's three evaluations: how labels are compared in each.
MODES = {
    "19-way": "(2*9+1)-way classification, the direction is part of the label",
    "10-way-no-dir": "(9+1)-way classification, the direction ignored",
    "10-way": "(9+1)-way classification, the direction taken into account (official)",
}


@dataclasses.dataclass(frozen=True)
class LabelScore:
  """One label's row of the scorer: counts, and P/R/F1 in percent."""
  correct: int
  predicted: int  # every prediction of this label (in 10-way: of this relation, either direction)
  wrong_direction: int  # gold this relation, predicted the same relation with the other direction (10-way only)
  gold: int
  precision: float
  recall: float
  f1: float


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One of the scorer's evaluations. Figures are in percent, as the Perl scorer prints them (with %.2f)."""
  mode: str
  labels: tuple[str, ...]  # rows: the labels of the answer key, in the scorer's order
  columns: tuple[str, ...]  # the labels of the key, then predicted labels absent from the key
  confusion: np.ndarray  # [gold label, predicted label] counts; wrong directions are counted apart (10-way)
  wrong_direction: np.ndarray  # [gold label]: right relation, wrong direction (zeros unless mode is 10-way)
  skipped: np.ndarray  # [gold label]: key examples without a prediction
  per_label: dict[str, LabelScore]  # every label of the key, Other included
  micro: tuple[float, float, float]  # P, R, F1 over the relations (Other left out)
  macro: tuple[float, float, float]  # unweighted means of the relations' P, R and F1 (Other left out)
  accuracy: float  # correct / predicted examples
  accuracy_skipped_wrong: float  # correct / key examples
  accuracy_skipped_other: float  # (correct + skipped Other examples) / key examples
  coverage: float  # predicted / key examples
  n_predicted: int
  n_gold: int


@dataclasses.dataclass(frozen=True)
class SemEvalScore:
  """The three evaluations; `official` is the task's score (macro-F1 of the 10-way evaluation, in percent)."""
  evaluations: dict[str, Evaluation]
  other: str

  @property
  def official(self) -> float:
    return self.evaluations["10-way"].macro[2]

  def report(self) -> str:
    return report(self)


def relation_of(label: str) -> str:
  """'Cause-Effect(e2,e1)' -> 'Cause-Effect'; undirected labels stay as they are."""
  return _DIRECTION.sub("", label)


def _as_mapping(labels: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
  if isinstance(labels, Mapping):
    return {str(k): v for k, v in labels.items()}
  return {str(i): v for i, v in enumerate(labels)}


def _evaluate(pairs: list[tuple[str, str]], key: list[str], mode: str, other: str) -> Evaluation:
  """The Perl scorer's `evaluate` on (predicted, gold) pairs of the predicted examples and every gold label of the
  key, in its order of operations so that the floating-point results are the same to the last bit."""
  def name(label):  # the scorer's internal name: Other sorts after the relations
    return _SORTS_OTHER_AS if label == other else label

  def strip(label):
    return label if mode == "19-way" else relation_of(label)

  conf, predicted, wrong = Counter(), Counter(), Counter()
  for pred, gold in pairs:
    p, g = name(strip(pred)), name(strip(gold))
    if mode == "10-way" and pred != gold and p == g:
      wrong[g] += 1  # the relation is right, its direction wrong: a miss for the relation, never a hit
      continue
    conf[p, g] += 1
    predicted[p] += 1
  answer = Counter(name(strip(g)) for g in key)
  rows = sorted(answer)
  columns = rows + sorted(set(predicted) - set(answer))
  confusion = np.array([[conf[p, g] for p in columns] for g in rows], np.int64).reshape(len(rows), len(columns))
  wrong_dir = np.array([wrong[g] for g in rows], np.int64)
  skipped = np.array([answer[g] for g in rows], np.int64) - confusion.sum(axis=1) - wrong_dir

  n_pred, n_gold = len(pairs), len(key)
  correct = sum(conf[g, g] for g in rows)
  other_skipped = int(skipped[rows.index(_SORTS_OTHER_AS)]) if _SORTS_OTHER_AS in rows else 0
  per_label, relations = {}, 0
  macro_p = macro_r = macro_f1 = 0
  micro_correct = micro_predicted = micro_gold = 0
  for g in rows:
    proposed = predicted[g] + wrong[g]
    p = 0 if predicted[g] == 0 else 100.0 * conf[g, g] / proposed
    r = 0 if answer[g] == 0 else 100.0 * conf[g, g] / answer[g]
    f1 = 0 if p + r == 0 else 2 * p * r / (p + r)
    per_label[other if g == _SORTS_OTHER_AS else g] = LabelScore(conf[g, g], proposed, wrong[g], answer[g], float(p),
                                                                  float(r), float(f1))
    if g != _SORTS_OTHER_AS:
      relations += 1
      macro_p += p
      macro_r += r
      macro_f1 += f1
      micro_correct += conf[g, g]
      micro_predicted += proposed
      micro_gold += answer[g]
  micro_p = 0 if micro_predicted == 0 else 100.0 * micro_correct / micro_predicted
  micro_r = 0 if micro_gold == 0 else 100.0 * micro_correct / micro_gold
  micro_f1 = 0 if micro_p + micro_r == 0 else 2.0 * micro_p * micro_r / (micro_p + micro_r)
  # The Perl scorer divides by the number of relations of the key (and dies on a key of Other only).
  macro = tuple(float(x / relations) if relations else 0.0 for x in (macro_p, macro_r, macro_f1))
  public = tuple(other if g == _SORTS_OTHER_AS else g for g in columns)
  return Evaluation(
      mode=mode, labels=public[:len(rows)], columns=public, confusion=confusion, wrong_direction=wrong_dir,
      skipped=skipped, per_label=per_label, micro=(float(micro_p), float(micro_r), float(micro_f1)), macro=macro,
      accuracy=100.0 * correct / n_pred if n_pred else 0.0, accuracy_skipped_wrong=100.0 * correct / n_gold,
      accuracy_skipped_other=100.0 * (correct + other_skipped) / n_gold, coverage=100.0 * n_pred / n_gold,
      n_predicted=n_pred, n_gold=n_gold)


def score(gold: Mapping[str, str] | Sequence[str], predicted: Mapping[str, str] | Sequence[str],
          other: str = "Other") -> SemEvalScore:
  """Scores predictions against an answer key, as the official scorer does.

  Both are {example id: label} (or label lists in the same example order). The predictions may leave key examples
  out (they are 'skipped'); an id the key lacks is an error. A predicted label the key never uses counts against
  precision nowhere and against recall like Other, as in the Perl scorer. `other` names the no-relation label.
  """
  gold, predicted = _as_mapping(gold), _as_mapping(predicted)
  if not gold:
    raise ValueError("the answer key is empty")
  unknown = [i for i in predicted if i not in gold]
  if unknown:
    raise ValueError(f"{len(unknown)} predicted id(s) are not in the answer key, e.g. {unknown[0]!r}")
  pairs = [(label, gold[i]) for i, label in predicted.items()]
  key = list(gold.values())
  return SemEvalScore({mode: _evaluate(pairs, key, mode, other) for mode in MODES}, other)


# ---- answer files ------------------------------------------------------------------------------------------------

def write_answers(path: str, ids: Sequence, labels: Sequence[str]) -> None:
  """'ID<TAB>label' lines, each ending in a newline (the Perl scorer rejects a last line without one). The Perl
  scorer takes numeric ids and the 19 labels of the task only; this writer checks only that the lines stay lines."""
  if len(ids) != len(labels):
    raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for i, label in zip(ids, labels):
      i = str(i)
      if not i or re.search(r"[\t\r\n]", i + label) or not label:
        raise ValueError(f"id {i!r} / label {label!r}: neither may be empty or hold a tab or a line break")
      f.write(f"{i}\t{label}\n")


def read_answers(path: str) -> dict[str, str]:
  """An 'ID<TAB>label' file -> {id: label}; a malformed line or a repeated id is an error naming the line."""
  out, lines = {}, {}
  with open(path, encoding="utf-8", newline="") as f:
    for lineno, line in enumerate(f, 1):
      m = re.fullmatch(r"([^\t\r\n]+)\t([^\t\r\n]+)\r?\n?", line)
      if not m:
        raise ValueError(f"{path}:{lineno}: expected 'ID<TAB>label': {line.rstrip()!r}")
      if m.group(1) in out:
        raise ValueError(f"{path}:{lineno}: id {m.group(1)} already given on line {lines[m.group(1)]}")
      out[m.group(1)], lines[m.group(1)] = m.group(2), lineno
  return out


def score_files(predicted_path: str, key_path: str, other: str = "Other") -> SemEvalScore:
  """The scorer's command line: proposed answers first, then the answer key."""
  return score(read_answers(key_path), read_answers(predicted_path), other)


# ---- report ------------------------------------------------------------------------------------------------------

def _short_names(labels: Sequence[str], other: str) -> list[str]:
  """The scorer's column names ('C-E' for Cause-Effect, 'C-E1' for Cause-Effect(e1,e2), '_O_' for Other) where they
  are distinct, else numbers."""
  names = []
  for label in labels:
    m = re.match(r"(.)[^-]+-(.)", label)
    name = "_O_" if label == other else (f"{m.group(1)}-{m.group(2)}" if m else label[:4])
    d = re.search(r"\(e([12])", label)
    names.append(name + (d.group(1) if d else ""))
  return names if len(set(names)) == len(names) else [f"#{i}" for i in range(len(labels))]


def _confusion_text(ev: Evaluation, other: str) -> list[str]:
  names = _short_names(ev.columns, other)
  width = max(5, *(len(n) + 1 for n in names))
  tail = ["xDIR"] if ev.mode == "10-way" else []
  out = [" " * width + " |" + "".join(f"{n:>{width}}" for n in names) + " |"
         + "".join(f"{h:>6}" for h in ["sum", *tail, "skip", "gold"])]
  for row, label in enumerate(ev.labels):
    counts = ev.confusion[row]
    extra = [int(counts.sum()), *([int(ev.wrong_direction[row])] if tail else []), int(ev.skipped[row]),
             ev.per_label[label].gold]
    out.append(f"{names[row]:>{width}} |" + "".join(f"{int(c):>{width}}" for c in counts) + " |"
               + "".join(f"{c:>6}" for c in extra))
  out.append(f"{'sum':>{width}} |" + "".join(f"{int(c):>{width}}" for c in ev.confusion.sum(axis=0)) + " |")
  legend = [f"{n} = {label}" for n, label in zip(names, ev.columns) if n != label]
  line = ""
  for entry in legend:  # whole entries per line
    if line and len(line) + len(entry) > 100:
      out.append("  " + line.rstrip(", "))
      line = ""
    line += entry + ", "
  if line:
    out.append("  " + line.rstrip(", "))
  return out


def _evaluation_text(ev: Evaluation, other: str) -> list[str]:
  summaries = {"micro": f"micro (without {other})", "MACRO": f"MACRO (without {other})"}
  width = max(*(len(label) for label in ev.per_label), *(len(s) for s in summaries.values()))
  header = (f"  {'label':<{width}} {'P':>7} {'R':>7} {'F1':>7} {'correct':>8} {'predicted':>10} {'wrong dir':>10}"
            f" {'gold':>6}")
  out = [MODES[ev.mode], header]
  for label, s in ev.per_label.items():
    out.append(f"  {label:<{width}} {s.precision:7.2f} {s.recall:7.2f} {s.f1:7.2f} {s.correct:8d} {s.predicted:10d}"
               f" {s.wrong_direction:10d} {s.gold:6d}")
  for name, (p, r, f1) in (("micro", ev.micro), ("MACRO", ev.macro)):
    out.append(f"  {summaries[name]:<{width}} {p:7.2f} {r:7.2f} {f1:7.2f}")
  out.append(f"  accuracy {ev.accuracy:.2f}% of the {ev.n_predicted} predicted examples; coverage {ev.coverage:.2f}%"
             f" of the {ev.n_gold} key examples")
  out.append("")
  out.append("  confusion matrix (rows: gold, columns: predicted"
             + ("; xDIR: right relation, wrong direction)" if ev.mode == "10-way" else ")"))
  out += ["  " + line for line in _confusion_text(ev, other)]
  return out


def report(result: SemEvalScore) -> str:
  """The official score first, then the official evaluation in full, then the other two evaluations' summaries."""
  official = result.evaluations["10-way"]
  n_relations = len(official.labels) - (result.other in official.labels)
  title = (f"official score: macro-averaged F1 = {result.official:.2f}% (over {n_relations} relations, direction "
           f"taken into account, {result.other} left out)")
  lines = [title, ""]
  lines += _evaluation_text(official, result.other)
  lines.append("")
  for mode in ("19-way", "10-way-no-dir"):
    ev = result.evaluations[mode]
    lines.append(f"{MODES[mode]}: macro P/R/F1 = {ev.macro[0]:.2f} / {ev.macro[1]:.2f} / {ev.macro[2]:.2f}%, "
                 f"micro F1 = {ev.micro[2]:.2f}%, accuracy = {ev.accuracy:.2f}%")
  return "\n".join(lines) + "\n"
