"""Sequence-to-sequence fine-tuning on the T5 encoder-decoder (translation, summarisation, dialogue responses):
teacher-forced cross-entropy with optional label smoothing over packed or one-pair rows, and on the dev and test
splits generation (greedy or beam search, jitted per batch) scored by sacreBLEU / chrF / ROUGE / distinct-n.

Rows (jaxlm/data/seq2seq.py): encoder_input_ids / encoder_segment_ids / encoder_positions [B, S], decoder_input_ids /
decoder_target_ids / decoder_segment_ids / decoder_positions / decoder_weights [B, T], attention_mask [B, S] (used
positions, for length grouping and bucketing) and example_ids [B] (the record's index; -1 for packed and padding rows).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import generation, text_metrics
from jaxlm.data import builders, rows, sources
from jaxlm.data import seq2seq as pairs_lib
from jaxlm.data.tokenizer import speaker_tag
from jaxlm.models.encdec import EncDec, EncDecConfig
from jaxlm.tasks.common import cross_entropy, fine_tuning_splits


def dummy_rows(batch_size: int, source_len: int, target_len: int) -> dict[str, np.ndarray]:
  """Arrays with the names, shapes and dtypes of seq2seq rows."""
  def ints(length, value=0):
    return np.full((batch_size, length), value, np.int32)

  positions = lambda length: np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
  return {"encoder_input_ids": ints(source_len), "encoder_segment_ids": ints(source_len, 1),
          "encoder_positions": positions(source_len), "decoder_input_ids": ints(target_len),
          "decoder_target_ids": ints(target_len), "decoder_segment_ids": ints(target_len, 1),
          "decoder_positions": positions(target_len), "decoder_weights": np.ones((batch_size, target_len), np.float32),
          "attention_mask": ints(source_len, 1), "example_ids": np.arange(batch_size, dtype=np.int32)}


def smoothed_cross_entropy(logits, targets, weights, smoothing: float, z_loss: float = 0.0):
  """(objective sum, CrossEntropy sums): the objective spreads `smoothing` of each target's probability uniformly over
  the vocabulary, (1 - s) * nll + s * mean_v(-log p_v) (fairseq's label_smoothed_cross_entropy), plus the z-loss;
  the CrossEntropy's `ce` stays the plain cross-entropy (perplexity)."""
  ce = cross_entropy(logits, targets, weights, z_loss)
  if not smoothing:
    return ce.loss, ce
  logits = logits.astype(jnp.float32)
  uniform = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)  # mean_v(-log p_v) per position
  return (1.0 - smoothing) * ce.loss + smoothing * jnp.sum(uniform * weights), ce


def lead(source: str, n: int) -> str:
  """The first n lines (turns) of an input, as one text: the LEAD-n summary."""
  return " ".join(source.split("\n")[:n])


def lead_baseline(config, split: str = "test", turns: int = 3) -> tuple[dict[str, float], str]:
  """(scores, report) of the LEAD-n baseline on a split of the config's pairs: the first `turns` lines of each input
  as its output, scored by task.metrics (ROUGE when empty) with the code that scores the model's outputs."""
  records = builders.open_source(pairs_lib.PAIRS, config.data).split(split).records
  names = text_metrics.check_names(config.task.metrics) or text_metrics.ROUGE
  scores, lines = text_metrics.score([lead(r["source"], turns) for r in records], [r["target"] for r in records],
                                     names)
  return scores, "\n".join([f"LEAD-{turns} on the {split} split ({len(records)} examples):", *lines])


class Seq2SeqTask:
  name = "seq2seq"
  kind = pairs_lib.PAIRS
  labels_from_data = False
  labels = ()

  def __init__(self, config):
    t, d = config.task, config.data
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    if config.init.hf_path:
      raise ValueError("task.name='seq2seq' starts from a jaxlm workdir: convert a Hugging Face T5 directory with "
                       "`jaxlm convert` and set init.checkpoint_dir to it (init.hf_path reads BERT directories)")
    self.model_cfg = EncDecConfig.from_config(config.model)
    self.model = EncDec(self.model_cfg)
    self.source_len, self.target_len = d.seq_len, d.target_len or d.seq_len
    self.prefix, self.pack, self.z_loss = t.prefix, d.pack_pairs, float(config.optim.z_loss)
    self._input_field = d.input_field
    self.label_smoothing = float(t.label_smoothing)
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
    self.beam_size, self.length_penalty = int(t.beam_size), float(t.length_penalty)
    self.no_repeat = int(t.no_repeat_ngram_size)
    if self.beam_size < 1:
      raise ValueError(f"task.beam_size must be at least 1 (1 = greedy), got {self.beam_size}")
    self.max_decode_len = int(t.max_decode_len) or self.target_len
    if self.max_decode_len < 1:
      raise ValueError(f"task.max_decode_len must be positive (0 = data.target_len), got {t.max_decode_len}")
    self.metrics = text_metrics.check_names(t.metrics)
    self.lead_turns, self.report_examples = int(t.lead_turns), int(t.report_examples)
    self.speaker_tags = int(t.speaker_tags)
    self.decoding = generation.encdec_decoding(self.model, self.max_decode_len + 1)  # + the start token
    self._tokenizer = None  # set by row_steps: predictions are decoded to text with the rows' tokenizer
    self._serving = False  # `jaxlm predict` reads its input: generate whatever task.metrics says

  # ---- model, loss, metrics ----
  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    return dummy_rows(batch_size, seq_len, self.target_len)

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, batch["encoder_input_ids"], batch["decoder_input_ids"])["params"]

  def pretrained_source(self):
    return None  # a jaxlm workdir (init.checkpoint_dir) is read by the run itself

  def logits(self, params, batch, rng=None, train: bool = False):
    return self.model.apply(
        {"params": params}, batch["encoder_input_ids"], batch["decoder_input_ids"], batch["encoder_segment_ids"],
        batch["decoder_segment_ids"], batch["encoder_positions"], batch["decoder_positions"],
        deterministic=not train, rngs={"dropout": rng} if train else None)  # [B, T, V]

  def loss_fn(self, params, batch, rng, train: bool):
    objective, ce = smoothed_cross_entropy(self.logits(params, batch, rng, train), batch["decoder_target_ids"],
                                           batch["decoder_weights"], self.label_smoothing if train else 0.0,
                                           self.z_loss)
    stats = {"loss": (ce.ce, ce.count), "accuracy": (ce.correct, ce.count)}
    if train and (self.label_smoothing or self.z_loss):
      stats["objective"] = (objective, ce.count)
    return objective / jnp.maximum(ce.count, 1.0), stats

  def _ids(self) -> tuple[int, int]:
    if self._tokenizer is None:
      raise RuntimeError("task.name='seq2seq' decodes predictions with the tokenizer its rows were made with; build "
                         "batches (row_steps) before predicting")
    return self._tokenizer.pad_id, self._tokenizer.eos_id

  def generate(self, params, batch):
    """Outputs for a batch of one-pair rows, from the decoder start token each row's decoder input begins with:
    tokens [B, max_decode_len] (EOS included, pad after) and lengths [B]."""
    pad_id, eos_id = self._ids()
    context = (batch["encoder_input_ids"], batch["encoder_segment_ids"])
    start = batch["decoder_input_ids"][:, :1]
    if self.beam_size > 1:
      out = generation.beam_search(self.decoding, params, start, beam_size=self.beam_size,
                                   max_new_tokens=self.max_decode_len, alpha=self.length_penalty, eos_id=eos_id,
                                   pad_id=pad_id, context=context, no_repeat_ngram_size=self.no_repeat)
    else:
      out = generation.sample(self.decoding, params, start, max_new_tokens=self.max_decode_len, temperature=0.0,
                              eos_id=eos_id, pad_id=pad_id, context=context, no_repeat_ngram_size=self.no_repeat)
    return {"tokens": out.tokens, "lengths": out.lengths}

  def predict(self, params, batch):
    if not (self.metrics or self.lead_turns or self._serving):
      return None  # nothing is scored from generated text: evaluation stays loss/perplexity only
    return self.generate(params, batch)

  def outputs(self, pairs, records_) -> dict[int, str]:
    """example id -> generated text (up to its EOS; speaker tags back to the record's names), over the (batch,
    predictions) pairs of a pass."""
    _, eos_id = self._ids()
    texts = {}
    for batch, out in pairs:
      ids = np.asarray(batch["example_ids"])
      for row in np.flatnonzero(ids >= 0):
        tokens = [int(t) for t in np.asarray(out["tokens"][row])[:int(out["lengths"][row])]]
        if tokens and tokens[-1] == eos_id:
          tokens = tokens[:-1]
        text = self._tokenizer.decode(tokens)
        if self.speaker_tags:
          text = pairs_lib.untag_speakers(text, records_[int(ids[row])]["source"], self.speaker_tags)
        texts[int(ids[row])] = text
    return texts

  def host_metrics(self, pairs, records_) -> dict:
    """task.metrics of the generated outputs against the targets (0-100), the LEAD-n baseline's beside them
    (task.lead_turns: lead{n}_{metric}), and a report with sacreBLEU's signatures and example outputs."""
    if not pairs:
      return {}
    texts = self.outputs(pairs, records_)
    ids = sorted(texts)
    hyps, refs = [texts[i] for i in ids], [records_[i]["target"] for i in ids]
    decoding = generation.describe(self.beam_size, self.length_penalty, self.no_repeat)
    report = [f"{len(ids)} examples; {decoding}, at most {self.max_decode_len} tokens"]
    result, lines = text_metrics.score(hyps, refs, self.metrics)
    report += lines
    if self.lead_turns:
      n = self.lead_turns
      scores, lines = text_metrics.score([lead(records_[i]["source"], n) for i in ids], refs,
                                         self.metrics or text_metrics.ROUGE)
      result.update({f"lead{n}_{k}": v for k, v in scores.items()})
      report += [f"LEAD-{n} (the first {n} lines of each input):"] + ["  " + line for line in lines]
    for i in ids[:self.report_examples]:
      r = records_[i]
      report += ["", f"[{r['where'] or i}]", "input:     " + r["source"].replace("\n", " / "),
                 "reference: " + r["target"], "output:    " + texts[i]]
    return {**result, "report": "\n".join(report)}

  # ---- input pipeline ----
  def row_steps(self, ctx: rows.RowContext) -> list:
    tok = ctx.tokenizer
    if tok.eos_id < 0:
      raise ValueError("task.name='seq2seq' ends every input and target with EOS, and the tokenizer has none")
    self._tokenizer = tok
    d = ctx.data_cfg
    encode = pairs_lib.EncodePair(tok, self.prefix, self.source_len, self.target_len)
    steps = [rows.Map(encode)]
    if self.speaker_tags:
      missing = [tag for tag in map(speaker_tag, range(1, self.speaker_tags + 1)) if tok.piece_to_id(tag) == tok.unk_id]
      if missing:
        trained = getattr(tok, "path", "") or "this tokenizer"
        raise ValueError(f"task.speaker_tags={self.speaker_tags} needs the tokenizer pieces {missing[0]} .. "
                         f"{missing[-1]}: a tokenizer the run trains has them; add them to "
                         f"tokenizer.user_defined_symbols of the run that trained {trained}")
      steps.insert(0, rows.Map(pairs_lib.TagSpeakers(self.speaker_tags)))
    if ctx.train and self.pack:
      pack = functools.partial(pairs_lib.pack_pairs, source_len=self.source_len, target_len=self.target_len,
                               num_bins=d.pack_bins, seed=ctx.seed, shuffle_bins=d.shuffle, pad_id=tok.pad_id,
                               start_id=tok.pad_id)
      return [*steps, rows.Stream(pack)]
    # T5 starts decoding from the pad id
    return [*steps, rows.Map(pairs_lib.PadPair(self.source_len, self.target_len, tok.pad_id, tok.pad_id))]

  def pad_values(self, tokenizer):
    return {"encoder_input_ids": tokenizer.pad_id, "decoder_input_ids": tokenizer.pad_id,
            "decoder_target_ids": tokenizer.pad_id, **pairs_lib.PAD_VALUES}

  def bucketed(self) -> bool:
    return True

  # ---- jaxlm predict ----
  def read_predict_input(self, path, input_format):
    """One input per line; a .jsonl file (unless --input-format lines): JSON lines with the input in data.input_field,
    else 'source'."""
    if input_format not in ("auto", "lines"):
      raise sources.DataError(f"--input-format={input_format!r} does not fit task.name='seq2seq': an input per line, "
                              "or JSON lines in a .jsonl file (auto)")
    self._serving = True
    if input_format == "auto" and path.endswith(".jsonl"):
      out = []
      for i, line in enumerate(pairs_lib.text_lines(pairs_lib.read_text(path)), 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise sources.DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        field = next((f for f in (self._input_field, "source") if isinstance(record, dict) and f in record), None)
        if field is None or not isinstance(record[field], str):
          raise sources.DataError(f"{path}:{i}: no text field {self._input_field!r} (data.input_field) or 'source'")
        out.append({"source": pairs_lib.clean_lines(record[field]), "target": "", "where": f"{path}:{i}"})
      return out
    return [{"source": pairs_lib.clean(line), "target": "", "where": f"{path}:{i}"}
            for i, line in enumerate(pairs_lib.text_lines(pairs_lib.read_text(path)), 1) if line.strip()]

  def write_predictions(self, records_, pairs, out, jsonl: bool) -> int:
    """The output text a line, or JSON lines {source, output}, in input order."""
    texts = self.outputs(pairs, records_)
    for i, record in enumerate(records_):
      if i not in texts:
        continue
      if jsonl:
        out.write(json.dumps({"source": record["source"], "output": texts[i]}, ensure_ascii=False) + "\n")
      else:
        out.write(texts[i].replace("\n", " ") + "\n")
    return len(texts)


TASK = Seq2SeqTask
