"""Corpus-level scores of generated text against references, on 0-100, through the field's own tools: sacreBLEU's BLEU
(and BLEU-n), chrF and 13a tokenizer, rouge-score's ROUGE-1/2/L/Lsum, and distinct-n over sacreBLEU's tokens."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_BLEU_N = re.compile(r"bleu([1-4])")
_DISTINCT_N = re.compile(r"distinct([1-4])")
KNOWN = ("bleu", "chrf", *ROUGE, "bleu1", "bleu2", "bleu3", "bleu4", "distinct1", "distinct2", "distinct3",
         "distinct4")


def check_names(names: Sequence[str], key: str = "task.metrics") -> tuple[str, ...]:
  """The metric names, each a known one."""
  names = tuple(n.strip() for n in names if n.strip())
  unknown = [n for n in names if n not in KNOWN]
  if unknown:
    raise ValueError(f"{key}: unknown metric {unknown[0]!r}; known: {', '.join(KNOWN)}")
  return names


def sentences(text: str) -> str:
  """Sentences one a line, as rougeLsum reads them: split after . ! or ? followed by whitespace, and at line breaks."""
  return "\n".join(s for s in re.split(r"(?<=[.!?])\s+|\n", text.strip()) if s)


def rouge(hypotheses: Sequence[str], references: Sequence[str], types: Sequence[str] = ROUGE) -> dict[str, float]:
  """Mean F1 over examples (x100) of rouge-score with the Porter stemmer; rougeLsum over sentences()."""
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
  totals = {t: [] for t in types}
  for hyp, ref in zip(hypotheses, references):
    scores = scorer.score(sentences(ref), sentences(hyp))  # score(target, prediction)
    for t in types:
      totals[t].append(scores[t].fmeasure)
  return {t: 100.0 * float(np.mean(v)) if v else 0.0 for t, v in totals.items()}


def distinct(hypotheses: Sequence[str], n: int) -> float:
  """Distinct-n (Li et al., 2016): distinct n-grams / all n-grams over every output (x100), on 13a tokens."""
  tokenize = Tokenizer13a()
  seen, total = Counter(), 0
  for hyp in hypotheses:
    ngrams, _ = extract_all_word_ngrams(tokenize(hyp.strip()), n, n)
    seen.update(ngrams)
    total += sum(ngrams.values())
  return 100.0 * len(seen) / total if total else 0.0


def score(hypotheses: Sequence[str], references: Sequence[str], names: Sequence[str]) -> tuple[dict[str, float],
                                                                                                 list[str]]:
  """(name -> score, report lines with sacreBLEU's score strings and signatures) for detokenised text, one reference
  per hypothesis."""
  hyps, refs = list(hypotheses), list(references)
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
  out, lines = {}, []
  for name in names:
    if name == "bleu" or _BLEU_N.fullmatch(name):
      order = 4 if name == "bleu" else int(name[-1])
      metric = BLEU(max_ngram_order=order)
      result = metric.corpus_score(hyps, [refs])
      out[name] = float(result.score)
      lines.append(f"{name}: {result} | {metric.get_signature()}")
    elif name == "chrf":
      metric = CHRF()
      result = metric.corpus_score(hyps, [refs])
      out[name] = float(result.score)
      lines.append(f"{name}: {result} | {metric.get_signature()}")
    elif _DISTINCT_N.fullmatch(name):
      out[name] = distinct(hyps, int(name[-1]))
      lines.append(f"{name}: {out[name]:.2f} (distinct / all {name[-1]}-grams of the outputs x100, 13a tokens)")
  types = [n for n in names if n in ROUGE]
  if types:
    out.update(rouge(hyps, refs, types))
    lines.append("rouge (rouge-score, F1 x100 averaged over examples, Porter stemmer; Lsum over sentences): "
                 + " ".join(f"{t}={out[t]:.2f}" for t in types))
  return out, lines
