"""Token classification / NER on the BERT encoder with a softmax or a linear-chain CRF head, tagging the first
sub-word of each word; evaluated at entity level with seqeval (precision, recall, F1 and classification_report).

Batches: encoder inputs, `labels` [B, L] (a tag id on first sub-words), `label_weights` [B, L] (1 there),
`word_index` [B, L] (the word's index in its sentence, -1 elsewhere), `word_context` [B, L] (how much of the sentence
the word sees in this row), `example_ids` [B] (-1 on padding rows) and `num_words` [B]. A sentence longer than a row
is split into overlapping windows (data.ner_stride); each word takes its prediction from the window where it sees the
most context, so every word is tagged once and every gold word is scored.

With data.pack_examples a row holds several sentences (or windows; jaxlm/data/example_packing.py): `example_ids` and
`num_words` are [B, M], and `segment_ids` / `positions` / `position_example_ids` [B, L] say whose each position is.
The encoder keeps attention inside a sentence, and the CRF restarts its chain at each sentence, so a packed row's loss
is the sum of its sentences' and its decode is theirs.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from seqeval import metrics as seqeval_metrics
from seqeval import scheme as seqeval_scheme
from seqeval.metrics.sequence_labeling import get_entities

from jaxlm.data import example_packing, ner, records, rows, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.models import crf
from jaxlm.models.encoder import INPUT_NAMES, dummy_inputs
from jaxlm.models.heads import TokenClassifier
from jaxlm.tasks.common import (
  bert_source,
  check_head,
  check_label_ids,
  cross_entropy,
  encoder_config,
  fine_tuning_splits,
  resolved_labels,
)

HEADS = ("softmax", "crf")
# data.tag_scheme -> seqeval's scheme class, used in strict mode
SEQEVAL_SCHEMES = {"iob1": seqeval_scheme.IOB1, "iob2": seqeval_scheme.IOB2, "bioes": seqeval_scheme.IOBES}
INPUT_FORMATS = ("auto", "lines", "conll")


class NerTask:
  name = "ner"
  kind = records.NER
  labels_from_data = True

  def __init__(self, config):
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg, self.hf_path = encoder_config(config)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.labels = resolved_labels(config)
    self.scheme = config.data.tag_scheme.lower()
    if self.scheme not in SEQEVAL_SCHEMES:
      raise ValueError(f"data.tag_scheme='{config.data.tag_scheme}': expected one of {', '.join(SEQEVAL_SCHEMES)}")
    self.strict = config.task.seqeval_strict
    allowed = (None, None)
    if self.head == "crf" and config.task.crf_constrained:
      if self.scheme != "iob2":
        raise ValueError(f"task.crf_constrained=True knows the IOB2 rules only, but data.tag_scheme="
                         f"'{config.data.tag_scheme}': set task.crf_constrained=False")
      transitions, start = crf.iob2_constraints(self.labels)
      allowed = (tuple(map(tuple, transitions.tolist())), tuple(start.tolist()))
    self.model = TokenClassifier(self.model_cfg, len(self.labels), config.task.head_dropout,
                                 crf=self.head == "crf", allowed_transitions=allowed[0], allowed_start=allowed[1])
    self.max_examples = example_packing.max_examples(config.data) if config.data.pack_examples else 0

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size, seq_len), np.int32)
    per_row = (batch_size, self.max_examples) if self.max_examples else (batch_size,)  # [B, M] packed, else [B]
    out = {**dummy_inputs(batch_size, seq_len), "labels": ints, "label_weights": np.ones_like(ints, np.float32),
           "word_index": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ints.shape).copy(),
           "word_context": np.zeros((batch_size, seq_len), np.float32),
           "example_ids": np.arange(np.prod(per_row), dtype=np.int32).reshape(per_row),
           "num_words": np.full(per_row, seq_len, np.int32)}
    if self.max_examples:
      out.update(example_packing.dummy_arrays(batch_size, seq_len, self.max_examples))
    return out

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES),
                           **example_packing.encoder_inputs(batch))["params"]

  def _chains(self, batch, order):
    """The CRF's restarts at the compacted positions of a packed batch (a new sentence begins); None unpacked."""
    if "segment_ids" not in batch:
      return None
    return crf.segment_restarts(crf.gather(batch["segment_ids"], order))

  def pretrained_source(self):
    """init.hf_path's encoder (the head stays fresh), or None."""
    return bert_source(self.hf_path)

  def loss_fn(self, params, batch, rng, train: bool):
    logits, scores = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), deterministic=not train,
                                      rngs={"dropout": rng} if train else None,
                                      **example_packing.encoder_inputs(batch))  # [B, L, N]
    w = batch["label_weights"]
    words = jnp.sum(w)
    if scores is None:
      ce = cross_entropy(logits, batch["labels"], w)
      return ce.loss / jnp.maximum(words, 1.0), {"loss": (ce.loss, words), "accuracy": (ce.correct, words)}
    # the chain runs over words: every first sub-word takes part, weighted per sentence; the loss is per word
    emissions, mask, order, _ = crf.compact_emissions(logits, batch["word_index"] >= 0)
    tags = crf.gather(batch["labels"], order)
    ll = crf.log_likelihood(emissions, tags, mask, scores["transitions"], scores["start"], scores["end"],
                            self._chains(batch, order))  # [B]: a packed row's, the sum of its sentences'
    real = jnp.any((batch["example_ids"] >= 0).reshape(ll.shape[0], -1), axis=-1)  # [B]
    total = -jnp.sum(ll * real)
    return total / jnp.maximum(words, 1.0), {"loss": (total, words)}

  def predict(self, params, batch):
    """tags [B, L]: a tag id at each first sub-word (word_index >= 0), -1 elsewhere."""
    logits, scores = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES),
                                      **example_packing.encoder_inputs(batch))
    first = batch["word_index"] >= 0
    if scores is None:
      return {"tags": jnp.where(first, jnp.argmax(logits, axis=-1), -1).astype(jnp.int32)}
    emissions, mask, order, count = crf.compact_emissions(logits, first)
    tags, _ = crf.viterbi(emissions, mask, scores["transitions"], scores["start"], scores["end"],
                          self._chains(batch, order))
    return {"tags": crf.scatter_back(tags, order, count, -1)}

  def words(self, pairs) -> dict[int, dict[int, tuple[int, int]]]:
    """example id -> word index -> (gold tag id, predicted tag id), over the rows (windows) of an eval pass: a word in
    several windows takes the prediction of the one where its word_context is highest (the first of equals). A
    position's example is position_example_ids in packed rows, its row's example_ids otherwise."""
    best: dict[int, dict[int, tuple[float, int, int]]] = {}
    for batch, out in pairs:
      word_index = np.asarray(batch["word_index"])
      ids = (np.asarray(batch["position_example_ids"]) if "position_example_ids" in batch else
             np.broadcast_to(np.asarray(batch["example_ids"])[:, None], word_index.shape))  # [B, L]
      gold, pred = np.asarray(batch["labels"]), np.asarray(out["tags"])
      context = np.asarray(batch["word_context"]) if "word_context" in batch else np.zeros(word_index.shape)
      for row, pos in zip(*np.nonzero((word_index >= 0) & (ids >= 0))):  # row-major: rows in order, positions too
        sentence = best.setdefault(int(ids[row, pos]), {})
        w, score = int(word_index[row, pos]), float(context[row, pos])
        if w not in sentence or score > sentence[w][0]:
          sentence[w] = (score, int(gold[row, pos]), int(pred[row, pos]))
    return {example: {w: (g, p) for w, (_, g, p) in sentence.items()} for example, sentence in best.items()}

  def sentences(self, pairs) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tag names per sentence, words in order; a sentence split over rows (windows) is joined by
    example id and word index."""
    words = self.words(pairs)
    y_true, y_pred = [], []
    for example in sorted(words):
      sentence = [words[example][i] for i in sorted(words[example])]
      gold_ids = np.array([g for g, _ in sentence])
      check_label_ids(gold_ids, np.ones_like(gold_ids), self.labels, f"eval example {example}")
      y_true.append([self.labels[g] for g, _ in sentence])
      y_pred.append([self.labels[p] for _, p in sentence])
    return y_true, y_pred

  def entities(self, tags: list[str]) -> list[tuple[str, int, int]]:
    """A sentence's tag names -> its entities as (type, first word, last word), read the way the metrics read them."""
    if self.strict:
      spans = seqeval_scheme.Entities([tags], SEQEVAL_SCHEMES[self.scheme]).entities[0]
      return [(e.tag, e.start, e.end - 1) for e in spans]
    return [tuple(e) for e in get_entities(tags)]

  def host_metrics(self, pairs, records_) -> dict:
    """Entity-level precision / recall / f1 (micro over entity types), word accuracy, and seqeval's
    classification_report text under "report"."""
    y_true, y_pred = self.sentences(pairs)
    if not y_true:
      return {}
    kw = {"mode": "strict", "scheme": SEQEVAL_SCHEMES[self.scheme]} if self.strict else {}
    flat_true = [t for s in y_true for t in s]
    flat_pred = [t for s in y_pred for t in s]
    return {
        "precision": float(seqeval_metrics.precision_score(y_true, y_pred, zero_division=0, **kw)),
        "recall": float(seqeval_metrics.recall_score(y_true, y_pred, zero_division=0, **kw)),
        "f1": float(seqeval_metrics.f1_score(y_true, y_pred, zero_division=0, **kw)),
        "accuracy": float(np.mean([a == b for a, b in zip(flat_true, flat_pred)])),
        "report": seqeval_metrics.classification_report(y_true, y_pred, digits=4, zero_division=0, **kw),
    }

  def row_steps(self, ctx):
    tokenizer_lib.require_ids(ctx.tokenizer, ("cls", "sep"), self.name)
    label_ids = {label: i for i, label in enumerate(self.labels)}
    return [rows.FlatMap(ner.AlignTags(ctx.tokenizer, ctx.data_cfg.seq_len, label_ids, ctx.data_cfg.ner_stride)),
            *example_packing.steps(ctx.data_cfg, ner.LAYOUT, self.pad_values(ctx.tokenizer))]

  def pad_values(self, tokenizer):
    return {"input_ids": tokenizer.pad_id, **ner.PAD_VALUES, **example_packing.PAD_VALUES}

  def bucketed(self) -> bool:
    return True

  def read_predict_input(self, path, input_format):
    """Whitespace-tokenised sentences one per line (blank lines skipped), or CoNLL (a token per line, tag columns
    after it, blank lines between sentences). 'auto' takes CoNLL only when the file has -DOCSTART- or every
    non-blank line is a token followed by one of the model's tags."""
    if input_format not in INPUT_FORMATS:
      raise sources.DataError(f"--input-format={input_format!r} does not fit task.name='ner': expected one of "
                              f"{', '.join(INPUT_FORMATS)}")
    lines = sources.read_lines(path)
    known = set(self.labels)
    if input_format == "auto":
      conll = any(t.startswith("-DOCSTART-") for _, t in lines) or (bool(lines) and all(
          len(t.split()) >= 2 and t.split()[-1] in known for _, t in lines))
      input_format = "conll" if conll else "lines"
    if input_format == "lines":
      return [{"tokens": t.split(), "tags": [self.labels[0]] * len(t.split()), "where": f"{path}:{n}"}
              for n, t in lines]
    sentences, words, start, last = [], [], 0, 0
    for n, t in lines:
      if t.startswith("-DOCSTART-"):
        continue
      if words and n != last + 1:  # a blank line (skipped by read_lines) ended the sentence
        sentences.append((start, words))
        words = []
      if not words:
        start = n
      words.append(t.split()[0])  # the word; tag columns, if any, are ignored
      last = n
    if words:
      sentences.append((start, words))
    return [{"tokens": w, "tags": [self.labels[0]] * len(w), "where": f"{path}:{n}"} for n, w in sentences]

  def write_predictions(self, records_, pairs, out, jsonl: bool) -> int:
    """CoNLL (word<TAB>tag, a blank line after each sentence) or JSON lines with tags and typed entity spans."""
    words = self.words(pairs)
    for i, record in enumerate(records_):
      predicted = words.get(i, {})
      missing = [w for w in range(len(record["tokens"])) if w not in predicted]
      if missing:  # the windows cover every word: a gap is a bug, never a silent 'O'
        raise RuntimeError(f"{record.get('where') or f'sentence {i}'}: no prediction for word {missing[0]} of "
                           f"{len(record['tokens'])}")
      tags = [self.labels[predicted[w][1]] for w in range(len(record["tokens"]))]
      if jsonl:
        spans = [{"type": t, "start": s, "end": e + 1, "text": " ".join(record["tokens"][s:e + 1])}
                 for t, s, e in self.entities(tags)]
        out.write(json.dumps({"tokens": record["tokens"], "tags": tags, "entities": spans}) + "\n")
      else:
        out.writelines(f"{w}\t{t}\n" for w, t in zip(record["tokens"], tags))
        out.write("\n")
    return len(records_)


TASK = NerTask
