"""Relation classification (SemEval-2010 Task 8 and tagged sentences like it) on the BERT encoder: entity markers
around the two arguments, the "entity start" head (the hidden states at [E1] and [E2], concatenated, -> dropout ->
dense), cross-entropy, and the official SemEval scorer (macro-F1 over the relations, Other left out) as the metric.

Batches: encoder inputs, `e1_start` / `e2_start` [B] (positions of the [E1] and [E2] markers), `labels` [B],
`example_weights` [B] (0 on padding rows) and `example_ids` [B] (-1 on padding rows). With data.pack_examples
(jaxlm/data/example_packing.py) a row holds several sentences and these are [B, M] (marker positions in the row).
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import example_packing, records, relations, rows, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import DataError
from jaxlm.models import layers
from jaxlm.models.encoder import INPUT_NAMES, Encoder, EncoderConfig, dummy_inputs
from jaxlm.models.heads import Dense
from jaxlm.tasks import semeval_scorer
from jaxlm.tasks.common import (
  bert_source,
  check_head,
  check_label_ids,
  cross_entropy,
  encoder_config,
  fine_tuning_splits,
  resolved_labels,
)

HEADS = ("entity_start",)
INPUT_FORMATS = ("auto", "lines")  # auto: .jsonl by name, the SemEval layout by its 'ID<TAB>"sentence"' lines
OTHER = "Other"  # the no-relation label: listed first, and left out of the official score
_SEMEVAL_LINE = re.compile(r"(\d+)\t(.*)")  # 'ID<TAB>"sentence"'
_TEXT = tfds.features.Text()
_SPAN = tfds.features.Tensor(shape=(2,), dtype=np.int32)


# ---- records -----------------------------------------------------------------------------------------------------

class RelationRecords(records.RecordKind):
  """Tagged sentences with a relation label: {'id', 'text', 'e1', 'e2', 'label', 'line', 'where'} ('e1'/'e2' are the
  arguments' [start, end) character spans in the untagged text), from SemEval-2010 Task 8 files or, for names ending
  in .jsonl, JSON lines {"text": "... <e1>..</e1> ... <e2>..</e2> ...", "label": ..., "id": optional}.

  Without dev files the dev split is a fixed stratified share (data.eval_fraction) of the train records: each label
  gives its share, drawn with a seed of its own (jaxlm.data.relations.dev_split), so it moves with neither train.seed
  nor the other labels.
  """
  name = "relation"
  local_source = "semeval"
  has_labels = True
  # no rare-label check: SemEval-2010's own train split holds Entity-Destination(e2,e1) once (TRAIN_FILE.TXT:12737)
  outside_label = OTHER

  def features(self):
    return {"id": _TEXT, "text": _TEXT, "e1": _SPAN, "e2": _SPAN, "label": _TEXT, "line": np.int32, "where": _TEXT}

  def options(self, data_cfg):
    return {"labels": list(data_cfg.labels)}

  def read(self, path, options):
    out = relations.read_semeval(path, options["labels"] or None)
    for r in out:
      r["where"] = f"{path}:{r['line']}"
    return out

  def decode(self, raw):
    return {"id": records.text(raw["id"]), "text": records.text(raw["text"]), "e1": tuple(int(x) for x in raw["e1"]),
            "e2": tuple(int(x) for x in raw["e2"]), "label": records.text(raw["label"]), "line": int(raw["line"]),
            "where": records.text(raw["where"])}

  def sources(self):
    return (self.local_source,)

  def labels_of(self, record):
    return (record["label"],)

  def holdout(self, records_, fraction, split):
    try:
      train, dev = relations.dev_split_indices([r["label"] for r in records_], float(fraction))
    except ValueError as e:
      raise DataError(f"data.eval_fraction={fraction} (the dev share of the train records without data.dev_files): "
                      f"{e}") from None
    return dev if split == "eval" else train

  def texts_of(self, records_):
    for r in records_:
      yield r["text"]


RELATION = RelationRecords()


# ---- model -------------------------------------------------------------------------------------------------------

class EntityStartClassifier(nn.Module):
  """hidden states at the [E1] and [E2] markers, concatenated -> dropout -> dense: logits [B, C] (the "entity start"
  representation of Baldini Soares et al., 2019). Packed rows (segment_ids, positions) give the markers of each of
  their examples, e1_start / e2_start [B, M]: logits [B, M, C]."""
  cfg: EncoderConfig
  num_labels: int
  dropout: float

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, e1_start, e2_start, deterministic: bool = True,
               segment_ids=None, positions=None):
    c = self.cfg
    hidden, _ = Encoder(c, name="encoder")(input_ids, token_type_ids, attention_mask, deterministic, segment_ids,
                                           positions)  # [B, L, D]
    starts = jnp.stack([e1_start, e2_start], axis=-1)  # [B, (M,) 2]
    pair = jnp.take_along_axis(hidden, starts.reshape(starts.shape[0], -1, 1), axis=1)  # [B, (M *) 2, D]
    pair = pair.reshape(*starts.shape[:-1], 2 * c.d_model)  # [B, (M,) 2D]: [E1] state, then [E2] state
    pair = layers.Dropout(self.dropout)(pair, deterministic=deterministic)
    return Dense(self.num_labels, c.init_std, c.compute_dtype, name="classifier")(pair).astype(jnp.float32)


def _marker_rows(tokenizer, embeddings: np.ndarray) -> np.ndarray:
  """`embeddings` [V, D] with each entity marker's row set to the mean of the rows of its tag's pieces ('<', 'e',
  '##1', '>' for [E1]): a pre-trained model never saw its reserved slots as input, so their rows are untrained."""
  markers = relations.entity_markers(tokenizer)
  _check_markers(markers, tokenizer)
  out = np.array(embeddings, np.float32)
  for marker_id, ids in zip(markers.ids, markers.init_ids):
    out[marker_id] = np.mean(np.asarray(embeddings, np.float32)[list(ids)], axis=0)
  return out


def _check_markers(markers: relations.EntityMarkers, tokenizer) -> None:
  if markers.new_pieces:
    raise ValueError(
        f"task.name='relation' marks the arguments with {' '.join(relations.MARKER_NAMES)}, which the tokenizer's "
        f"{tokenizer.vocab_size} pieces lack (a BERT vocabulary's [unused0]..[unused3] serve as well): train the "
        "sentencepiece model with them, e.g. --config.tokenizer.user_defined_symbols=\"('[CLS]', '[SEP]', '[MASK]', "
        "'[E1]', '[/E1]', '[E2]', '[/E2]')\"")


# ---- task --------------------------------------------------------------------------------------------------------

class RelationTask:
  name = "relation"
  kind = RELATION
  labels_from_data = True

  def __init__(self, config):
    self.config = config
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg, self.hf_path = encoder_config(config)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.labels = resolved_labels(config)
    self.model = EntityStartClassifier(self.model_cfg, len(self.labels), config.task.head_dropout)
    self.max_examples = example_packing.max_examples(config.data) if config.data.pack_examples else 0

  def _apply(self, params, batch, train: bool = False, rng=None):
    return self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), batch["e1_start"],
                            batch["e2_start"], deterministic=not train, rngs={"dropout": rng} if train else None,
                            **example_packing.encoder_inputs(batch))

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    per_row = (batch_size, self.max_examples) if self.max_examples else (batch_size,)  # [B, M] packed, else [B]
    ints = np.zeros(per_row, np.int32)
    out = {**dummy_inputs(batch_size, seq_len), "e1_start": ints, "e2_start": ints.copy(), "labels": ints.copy(),
           "example_weights": np.ones(per_row, np.float32),
           "example_ids": np.arange(np.prod(per_row), dtype=np.int32).reshape(per_row)}
    if self.max_examples:
      out.update(example_packing.dummy_arrays(batch_size, seq_len, self.max_examples))
    return out

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES), batch["e1_start"],
                           batch["e2_start"], **example_packing.encoder_inputs(batch))["params"]

  def pretrained_source(self):
    """init.hf_path's encoder, its marker rows of the word embeddings set to the mean embedding of their tags' pieces
    (the head stays fresh); or None."""
    source = bert_source(self.hf_path)
    if source is None:
      return None
    if not self.config.tokenizer.path:
      raise ValueError(f"task.name='relation' from init.hf_path={self.hf_path} needs tokenizer.path (its vocab.txt) to "
                       "place the entity markers")
    tokenizer = tokenizer_lib.load_tokenizer(self.config, "")
    name, tree = source
    encoder = dict(tree["encoder"])
    encoder["word_embeddings"] = _marker_rows(tokenizer, encoder["word_embeddings"])
    return name, {**tree, "encoder": encoder}

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self._apply(params, batch, train, rng)  # [B, (M,) C]
    ce = cross_entropy(logits, batch["labels"], batch["example_weights"])
    return ce.loss / jnp.maximum(ce.count, 1.0), {"loss": (ce.loss, ce.count), "accuracy": (ce.correct, ce.count)}

  def predict(self, params, batch):
    logits = self._apply(params, batch)
    return {"labels": jnp.argmax(logits, axis=-1).astype(jnp.int32), "probs": jax.nn.softmax(logits, axis=-1)}

  def predictions(self, pairs) -> dict[int, tuple[int, int, float]]:
    """example id -> (gold label id, predicted label id, its probability), over the real rows of an eval pass."""
    out = {}
    for batch, o in pairs:
      ids = np.asarray(batch["example_ids"])  # [B], or [B, M] packed: the labels and predictions have its shape
      for at in zip(*np.nonzero(ids >= 0)):
        label = int(o["labels"][at])
        out[int(ids[at])] = (int(batch["labels"][at]), label, float(o["probs"][at][label]))
    return out

  def host_metrics(self, pairs, records_) -> dict:
    """accuracy (over all labels, direction included), macro_f1 (the official SemEval score on a 0-1 scale: macro-F1
    over the relations, a wrong direction counted wrong, Other left out) and the scorer's text report under "report",
    over the examples the pass saw."""
    predicted = self.predictions(pairs)
    if not predicted:
      return {}
    gold_ids = np.array([g for g, _, _ in predicted.values()])
    check_label_ids(gold_ids, np.ones_like(gold_ids), self.labels, "eval 'labels'")
    gold = {str(i): self.labels[g] for i, (g, _, _) in predicted.items()}
    guess = {str(i): self.labels[p] for i, (_, p, _) in predicted.items()}
    result = semeval_scorer.score(gold, guess, other=OTHER)
    return {"accuracy": float(np.mean([gold[i] == guess[i] for i in gold])), "macro_f1": result.official / 100.0,
            "report": result.report()}

  def row_steps(self, ctx):
    tokenizer_lib.require_ids(ctx.tokenizer, ("cls", "sep"), self.name)
    markers = relations.entity_markers(ctx.tokenizer)
    _check_markers(markers, ctx.tokenizer)
    label_ids = {label: i for i, label in enumerate(self.labels)}
    return [rows.Map(relations.EncodeRelation(ctx.tokenizer, ctx.data_cfg.seq_len, label_ids, markers)),
            *example_packing.steps(ctx.data_cfg, relations.LAYOUT, self.pad_values(ctx.tokenizer))]

  def pad_values(self, tokenizer):
    return {"input_ids": tokenizer.pad_id, "example_ids": -1, **example_packing.PAD_VALUES}

  def bucketed(self) -> bool:
    return True

  def read_predict_input(self, path, input_format):
    """Tagged sentences ('... <e1>x</e1> ... <e2>y</e2> ...'): a .jsonl file of {"text", "id" optional} objects; a
    SemEval-2010 Task 8 file ('ID<TAB>"sentence"' lines; label and comment lines, if any, are not read); or one
    sentence a line ('lines', and 'auto' for any other file). Errors name the file and line."""
    if input_format not in INPUT_FORMATS:
      raise DataError(f"--input-format={input_format!r} does not fit task.name='relation': expected one of "
                      f"{', '.join(INPUT_FORMATS)} (auto reads .jsonl files, SemEval files and tagged lines)")
    lines = sources.read_lines(path)
    jsonl = input_format == "auto" and path.endswith(".jsonl")
    semeval = input_format == "auto" and not jsonl and bool(lines) and _SEMEVAL_LINE.fullmatch(lines[0][1].strip())
    out = []
    for n, line in lines:
      rid, sentence = str(n), line.strip()
      if jsonl:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n}: invalid JSON ({e.msg}): {sources._snippet(line)}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
          raise DataError(f"{path}:{n}: expected a JSON object with a 'text' string: {sources._snippet(line)}")
        rid, sentence = str(obj.get("id", n)), obj["text"]
      elif semeval:
        m = _SEMEVAL_LINE.fullmatch(sentence)
        if not m:
          continue  # a label or comment line
        rid, sentence = m.group(1), m.group(2).strip()
        if len(sentence) >= 2 and sentence[0] == sentence[-1] == '"':  # inner quotes are not escaped
          sentence = sentence[1:-1]
      try:
        text, e1, e2 = relations.untag(sentence)
      except ValueError as e:
        raise DataError(f"{path}:{n}: {e}: {sources._snippet(line)}") from None
      out.append({"id": rid, "text": text, "e1": e1, "e2": e2, "label": self.labels[0], "line": n,
                  "where": f"{path}:{n}", "tagged": sentence})
    return out

  def write_predictions(self, records_, pairs, out, jsonl: bool) -> int:
    """'ID<TAB>label' lines (the official scorer's answer format; a line's number is the id of a sentence without
    one), or JSON lines {id, text (tagged), label, probability}, in input order."""
    predicted = self.predictions(pairs)
    for i, record in enumerate(records_):
      if i not in predicted:
        continue
      _, label, p = predicted[i]
      if jsonl:
        out.write(json.dumps({"id": record["id"], "text": record.get("tagged", record["text"]),
                              "label": self.labels[label], "probability": round(p, 6)}) + "\n")
      else:
        out.write(f"{record['id']}\t{self.labels[label]}\n")
    return len(predicted)


TASK = RelationTask
