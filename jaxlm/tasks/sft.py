"""Instruction and dialogue fine-tuning of a decoder (supervised fine-tuning on conversations): next-token
cross-entropy on the assistant's tokens only, over rows packed with several conversations (segment ids and
per-conversation positions keep them apart). On the dev and test splits: the response perplexity, and each assistant
turn generated from its context (greedy or beam search, stopping at the end marker) scored by task.metrics (BLEU-n,
distinct-n through jaxlm/text_metrics.py, as the seq2seq task scores).

Rows (jaxlm/data/chat.py): inputs / targets / weights / segment_ids / positions [B, T] and, for the one-turn eval rows,
example_ids / turns / prompt_lengths [B] (-1, -1, 0 in packed train rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import generation, text_metrics
from jaxlm.data import chat, rows
from jaxlm.models.decoder import Decoder, DecoderConfig
from jaxlm.tasks.common import cross_entropy, fine_tuning_splits


def dummy_rows(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """Arrays with the names, shapes and dtypes of sft rows."""
  ints = np.zeros((batch_size, seq_len), np.int32)
  return {"inputs": ints, "targets": ints, "weights": np.ones((batch_size, seq_len), np.float32),
          "segment_ids": ints + 1,
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
          "example_ids": np.arange(batch_size, dtype=np.int32), "turns": np.zeros(batch_size, np.int32),
          "prompt_lengths": np.ones(batch_size, np.int32)}


class SftTask:
  name = "sft"
  kind = chat.CHAT
  labels_from_data = False
  labels = ()

  def __init__(self, config):
    t, d = config.task, config.data
    if config.model.family != "decoder":
      raise ValueError(f"task.name='sft' fine-tunes a decoder (model.family='decoder'), not {config.model.family!r}")
    if config.init.hf_path:
      raise ValueError("task.name='sft' starts from a jaxlm workdir: convert a Hugging Face GPT-2 / Llama directory "
                       "with `jaxlm convert` and set init.checkpoint_dir to it (init.hf_path reads BERT directories)")
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg = DecoderConfig.from_config(config.model)
    self.model = Decoder(self.model_cfg)  # peft.attach may replace it with a LoRA-adapted clone: always use self.model
    self.seq_len, self.z_loss = int(d.seq_len), float(config.optim.z_loss)
    if self.seq_len > self.model_cfg.max_len:
      raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_len={self.model_cfg.max_len}")
    self.template = chat.ChatTemplate.from_config(d)
    self.metrics = text_metrics.check_names(t.metrics)
    self.beam_size, self.length_penalty = int(t.beam_size), float(t.length_penalty)
    self.no_repeat = int(t.no_repeat_ngram_size)
    self.max_decode_len = int(t.max_decode_len) or int(config.sample.max_new_tokens)
    self.report_examples = int(t.report_examples)
    # Replies are generated from the rows' context, at most prompt_width tokens of it (the latest), into a cache
    # that holds the context and max_decode_len new tokens.
    self.prompt_width = min(self.seq_len, self.model_cfg.max_len - self.max_decode_len)
    if self.metrics and self.prompt_width < 1:
      raise ValueError(f"task.max_decode_len={self.max_decode_len} leaves no room for a context in model.max_len="
                       f"{self.model_cfg.max_len}")
    # the cache holds what a reply needs, not max_len: attention and beam reordering touch only those slots
    self.cache_len = self.prompt_width + self.max_decode_len
    self.encoder: chat.ChatEncoder | None = None  # set by row_steps: rows and replies use the rows' tokenizer

  # ---- model, loss, metrics ----
  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    return dummy_rows(batch_size, seq_len)

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, batch["inputs"], batch["positions"], batch["segment_ids"])["params"]

  def pretrained_source(self):
    return None  # a jaxlm workdir (init.checkpoint_dir) is read by the run itself

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self.model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        deterministic=not train, rngs={"dropout": rng} if train else None)  # [B, T, V]
    ce = cross_entropy(logits, batch["targets"], batch["weights"], self.z_loss)
    stats = {"loss": (ce.ce, ce.count), "accuracy": (ce.correct, ce.count)}
    if self.z_loss:
      stats["z_loss"] = (ce.loss - ce.ce, ce.count)
    return ce.loss / jnp.maximum(ce.count, 1.0), stats

  def _encoder(self) -> chat.ChatEncoder:
    if self.encoder is None:
      raise RuntimeError("task.name='sft' decodes replies with the tokenizer its rows were made with; build batches "
                         "(row_steps) before predicting")
    return self.encoder

  def generate(self, params, batch):
    """A reply to each row's context (its first prompt_lengths inputs; the latest prompt_width of them): tokens
    [B, max_decode_len] (the end marker included, pad after) and lengths [B]."""
    encoder = self._encoder()
    width, lengths = self.prompt_width, batch["prompt_lengths"]
    start = jnp.maximum(lengths - width, 0)
    prompt = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, width))(batch["inputs"], start)  # [B, W]
    decoding = generation.decoder_decoding(self.model, self.cache_len)
    pad_id = max(encoder.tokenizer.pad_id, 0)
    if self.beam_size > 1:
      out = generation.beam_search(decoding, params, prompt, lengths - start, beam_size=self.beam_size,
                                   max_new_tokens=self.max_decode_len, alpha=self.length_penalty,
                                   eos_id=encoder.end_id, pad_id=pad_id, no_repeat_ngram_size=self.no_repeat)
    else:
      out = generation.sample(decoding, params, prompt, lengths - start, max_new_tokens=self.max_decode_len,
                              temperature=0.0, eos_id=encoder.end_id, pad_id=pad_id,
                              no_repeat_ngram_size=self.no_repeat)
    return {"tokens": out.tokens, "lengths": out.lengths}

  def predict(self, params, batch):
    if not self.metrics:
      return None  # nothing is scored from generated text: evaluation stays loss/perplexity only
    return self.generate(params, batch)

  def replies(self, pairs) -> dict[tuple[int, int], str]:
    """(conversation index, assistant message index) -> the generated reply's text (up to its end marker)."""
    encoder = self._encoder()
    out = {}
    for batch, predicted in pairs:
      ids, turns = np.asarray(batch["example_ids"]), np.asarray(batch["turns"])
      for row in np.flatnonzero(ids >= 0):
        tokens = [int(t) for t in np.asarray(predicted["tokens"][row])[:int(predicted["lengths"][row])]]
        if tokens and tokens[-1] == encoder.end_id:
          tokens = tokens[:-1]
        out[int(ids[row]), int(turns[row])] = encoder.tokenizer.decode(tokens)
    return out

  def host_metrics(self, pairs, records_) -> dict:
    """task.metrics of the replies against the assistant turns they stand for (0-100), and a report with sacreBLEU's
    signatures and example replies."""
    if not pairs:
      return {}
    replies = self.replies(pairs)
    keys = sorted(replies)
    hyps, refs = [replies[k] for k in keys], [records_[e]["contents"][t] for e, t in keys]
    decoding = generation.describe(self.beam_size, self.length_penalty, self.no_repeat)
    report = [(f"{len(keys)} assistant turns, each generated from its context; {decoding}, at most "
               f"{self.max_decode_len} tokens")]
    result, lines = text_metrics.score(hyps, refs, self.metrics)
    report += lines
    for e, t in keys[:self.report_examples]:
      r = records_[e]
      first = max(t - 4, 0)  # the last four messages of the context
      report += ["", f"[{r['where'] or e}, message {t + 1}]"] + (["..."] if first else [])
      report += [f"{role + ':':11}{content}" for role, content in zip(r["roles"][first:t], r["contents"][first:t])]
      report += ["reference: " + r["contents"][t], "reply:     " + replies[e, t]]
    return {**result, "report": "\n".join(report)}

  # ---- input pipeline ----
  def row_steps(self, ctx: rows.RowContext) -> list:
    self.encoder = chat.ChatEncoder(ctx.tokenizer, self.template)
    d = ctx.data_cfg
    if ctx.train:
      pack = functools.partial(chat.pack_conversations, seq_len=self.seq_len, num_bins=d.pack_bins, seed=ctx.seed,
                               shuffle_bins=d.shuffle)
      return [rows.Map(chat.EncodeConversation(self.encoder, self.seq_len)), rows.Stream(pack)]
    return [rows.FlatMap(chat.TurnRows(self.encoder, self.seq_len, max(ctx.tokenizer.pad_id, 0)))]

  def pad_values(self, tokenizer):
    pad = max(tokenizer.pad_id, 0)
    return {"inputs": pad, "targets": pad, **chat.PAD_VALUES}

  def bucketed(self) -> bool:
    return False

  # ---- jaxlm predict ----
  def read_predict_input(self, path, input_format):
    raise ValueError("task.name='sft' answers conversations with `jaxlm generate --workdir W --chat` (interactive) or "
                     "`--chat --chat-input FILE` (a user turn per line, or JSON lines of conversations)")

  def write_predictions(self, records_, pairs, out, jsonl):
    raise ValueError("task.name='sft' has no `jaxlm predict`: use `jaxlm generate --chat`")


TASK = SftTask
