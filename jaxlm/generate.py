"""`jaxlm generate`: text from a workdir's best (else latest) checkpoint through jaxlm/generation.py. A decoder
continues the prompt; an encoder-decoder (seq2seq, span corruption) reads the prompt as its input and writes its own
output. Sampling (greedy, temperature, top-k, top-p) or beam search, per the sample.* keys."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import evaluation, generation, train
from jaxlm import workdir as workdir_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import chat
from jaxlm.data import seq2seq as pairs_lib
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models.decoder import Decoder
from jaxlm.models.encdec import EncDec


def load_config_for_sampling(workdir: str, overrides=()):
  return config_lib.apply_overrides(workdir_lib.read_config(workdir), overrides)


def sample(model: Decoder, params, prompt, rng, *, max_new_tokens: int, temperature: float, top_k: int):
  """prompt [B, P] int32 -> [B, max_new_tokens] ids sampled from a decoder (no EOS stop): generation.sample."""
  decoding = generation.decoder_decoding(model, min(model.cfg.max_len, prompt.shape[1] + max_new_tokens))
  return generation.sample(decoding, params, prompt, max_new_tokens=max_new_tokens, rng=rng,
                           temperature=temperature, top_k=top_k).tokens


def load_params(config, workdir: str, tokenizer=None):
  """The model and the best-or-latest checkpoint's parameters, on the run's mesh; `tokenizer`, if given, must be the
  one the checkpoint was trained with."""
  setup = train.build(config)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = evaluation.restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()
  return setup.task.model, params, step


def _search(decoding, params, prompt, s, eos_id: int, pad_id: int, context=None):
  """[1, P] prompt -> the generated ids (up to, without, the EOS) by beam search or sampling per the sample.* keys."""
  if s.beam_size > 1:
    out = generation.beam_search(decoding, params, prompt, beam_size=int(s.beam_size),
                                 max_new_tokens=int(s.max_new_tokens), alpha=float(s.length_penalty), eos_id=eos_id,
                                 pad_id=pad_id, context=context, no_repeat_ngram_size=int(s.no_repeat_ngram_size))
  else:
    out = generation.sample(decoding, params, prompt, max_new_tokens=int(s.max_new_tokens),
                            rng=jax.random.key(int(s.seed)), temperature=float(s.temperature), top_k=int(s.top_k),
                            top_p=float(s.top_p), eos_id=eos_id, pad_id=pad_id, context=context,
                            no_repeat_ngram_size=int(s.no_repeat_ngram_size))
  new = [int(t) for t in np.asarray(out.tokens[0])[:int(out.lengths[0])]]
  return new[:-1] if new and new[-1] == eos_id else new


def generate_text(config, workdir: str, prompt: str) -> str:
  """A decoder's continuation of `prompt` (returned with the prompt), or an encoder-decoder's output for it as input
  (task.prefix put before it, as in training)."""
  tokenizer = load_tokenizer(config, workdir)
  workdir_lib.check_vocab(config, tokenizer)
  model, params, _ = load_params(config, workdir, tokenizer)
  s = config.sample
  eos_id, pad_id = tokenizer.eos_id, max(tokenizer.pad_id, 0)
  if isinstance(model, Decoder):
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id if tokenizer.bos_id >= 0 else eos_id]
    max_len = model.cfg.max_len
    if len(ids) + s.max_new_tokens > max_len:
      raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds model.max_len="
                       f"{max_len}")
    decoding = generation.decoder_decoding(model, len(ids) + s.max_new_tokens)  # the slots this search needs
    new = _search(decoding, params, jnp.asarray([ids], jnp.int32), s, eos_id, pad_id)
    return tokenizer.decode(ids + new)  # decoding the whole sequence keeps the spacing between prompt and sample
  if isinstance(model, EncDec):
    tags = int(config.task.speaker_tags)  # a dialogue's speakers as the workdir's model saw them in training
    source = pairs_lib.tag_speakers({"source": prompt, "target": ""}, tags)["source"] if tags else prompt
    ids = tokenizer.encode(config.task.prefix + source)[:config.data.seq_len - 1] + [eos_id]
    context = (jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), jnp.int32))
    decoding = generation.encdec_decoding(model, int(s.max_new_tokens) + 1)  # + the start token (T5: the pad id)
    text = tokenizer.decode(_search(decoding, params, jnp.full((1, 1), pad_id, jnp.int32), s, eos_id, pad_id, context))
    return pairs_lib.untag_speakers(text, prompt, tags) if tags else text
  raise ValueError(f"task.name='{config.task.name}' does not generate text: its model ({type(model).__name__}) has no "
                   "decoder")


# ---- chat: a decoder answering conversations in its workdir's chat template (task.name=sft) -------------------------


class ChatSession:
  """A workdir's decoder replying to conversations written in the workdir's chat template (data.chat_*), with the
  sample.* settings; a reply ends at the end marker. The history is cut from the left at turn boundaries
  (chat.truncate) so that it and max_new_tokens fit in model.max_len."""

  def __init__(self, config, workdir: str):
    if config.model.family != "decoder":
      raise ValueError(f"--chat needs a decoder; {workdir} holds a model.family='{config.model.family}' model")
    self.tokenizer = load_tokenizer(config, workdir)
    workdir_lib.check_vocab(config, self.tokenizer)
    self.model, self.params, _ = load_params(config, workdir, self.tokenizer)
    self.encoder = chat.ChatEncoder(self.tokenizer, chat.ChatTemplate.from_config(config.data))
    self.sample = config.sample
    self.budget = self.model.cfg.max_len - int(self.sample.max_new_tokens)  # prompt tokens at most
    if self.budget < 1:
      raise ValueError(f"sample.max_new_tokens={self.sample.max_new_tokens} leaves no room for a conversation in "
                       f"model.max_len={self.model.cfg.max_len}")
    self.decoding = generation.decoder_decoding(self.model)
    self.replies = 0  # replies so far: each draws with its own key, fold_in(sample.seed, n)

  def prompt_ids(self, roles, contents) -> list[int]:
    return self.encoder.prompt(roles, contents, self.budget)

  def reply(self, roles, contents) -> str:
    """The assistant's reply to a conversation (roles / contents of its messages so far)."""
    ids = self.prompt_ids(roles, contents)
    # prompts are right-padded to a power of two from 64 on: a few compiled widths serve every length
    width = min(max(64, 1 << (len(ids) - 1).bit_length()), self.budget)
    prompt = np.full((1, width), max(self.tokenizer.pad_id, 0), np.int32)
    prompt[0, :len(ids)] = ids
    lengths = np.asarray([len(ids)], np.int32)
    s, end_id, pad_id = self.sample, self.encoder.end_id, max(self.tokenizer.pad_id, 0)
    if s.beam_size > 1:
      out = generation.beam_search(self.decoding, self.params, prompt, lengths, beam_size=int(s.beam_size),
                                   max_new_tokens=int(s.max_new_tokens), alpha=float(s.length_penalty),
                                   eos_id=end_id, pad_id=pad_id, no_repeat_ngram_size=int(s.no_repeat_ngram_size))
    else:
      rng = jax.random.fold_in(jax.random.key(int(s.seed)), self.replies)
      out = generation.sample(self.decoding, self.params, prompt, lengths, max_new_tokens=int(s.max_new_tokens),
                              rng=rng, temperature=float(s.temperature), top_p=float(s.top_p),
                              top_k=min(int(s.top_k), self.model.cfg.vocab_size),  # k >= vocabulary: no filter
                              eos_id=end_id, pad_id=pad_id, no_repeat_ngram_size=int(s.no_repeat_ngram_size))
    self.replies += 1
    new = [int(t) for t in np.asarray(out.tokens[0])[:int(out.lengths[0])]]
    return self.tokenizer.decode(new[:-1] if new and new[-1] == end_id else new)


def _write_reply(out: TextIO, roles, contents, jsonl: bool) -> None:
  """The reply (the last message) as a line, or the whole conversation as a JSON line of {role, content} messages."""
  if jsonl:
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
  else:
    out.write(" ".join(contents[-1].split("\n")) + "\n")
  out.flush()


def chat_turns(session: ChatSession, lines: Iterable[str], out: TextIO, *, jsonl: bool = False,
               system: str = "") -> int:
  """One conversation, a user turn per non-blank line, each reply written as soon as it is made (interactive use
  reads the lines from stdin); the line '/reset' starts a new conversation. Returns the number of replies."""
  start = ([chat.SYSTEM], [system]) if system else ([], [])
  roles, contents = list(start[0]), list(start[1])
  n = 0
  for line in lines:
    turn = line.strip()
    if not turn:
      continue
    if turn == "/reset":
      roles, contents = list(start[0]), list(start[1])
      continue
    roles.append(chat.USER)
    contents.append(turn)
    reply = session.reply(roles, contents)
    roles.append(chat.ASSISTANT)
    contents.append(reply)
    _write_reply(out, roles, contents, jsonl)
    n += 1
  return n


def check_ends_with_user(conversations: list[dict]) -> None:
  for c in conversations:
    if c["roles"][-1] != chat.USER:
      raise DataError(f"{c['where']}: the last message is the {c['roles'][-1]}'s; a conversation to reply to ends "
                      "with a user turn")


def chat_conversations(session: ChatSession, conversations: list[dict], out: TextIO, *, jsonl: bool = False) -> int:
  """A reply to each conversation (records of jaxlm/data/chat.py, each ending with a user turn), in order."""
  check_ends_with_user(conversations)
  for c in conversations:
    reply = session.reply(c["roles"], c["contents"])
    _write_reply(out, [*c["roles"], chat.ASSISTANT], [*c["contents"], reply], jsonl)
  return len(conversations)


def run_chat(config, workdir: str, input_path: str | None = None, output_path: str | None = None,
             system: str = "") -> int:
  """`jaxlm generate --chat`: replies to the user turns of stdin (interactive) or of `input_path` (a turn per line:
  one conversation), or to each conversation of a .jsonl / .json file (messages, or prompt fields, per data.*_field);
  written to `output_path` (a .jsonl path: the conversations with their replies) or stdout. Returns the replies made."""
  fields = {k: config.data[f"{k}_field"] for k in ("messages", "prompt", "response", "system")}
  conversations = None
  if input_path and input_path.lower().removesuffix(".gz").endswith((".jsonl", ".json")):
    conversations = chat.read_conversations(input_path, fields, need_assistant=False)
    check_ends_with_user(conversations)  # before the model is loaded
  session = ChatSession(config, workdir)
  jsonl = bool(output_path) and output_path.endswith(".jsonl")
  with open(output_path, "w", encoding="utf-8") if output_path else contextlib.nullcontext(sys.stdout) as out:
    if conversations is not None:
      return chat_conversations(session, conversations, out, jsonl=jsonl)
    if input_path:
      with open(input_path, encoding="utf-8") as f:
        return chat_turns(session, f, out, jsonl=jsonl, system=system)
    if sys.stdin.isatty():
      print("type a message and press Enter; '/reset' starts over, Ctrl-D ends", file=sys.stderr, flush=True)
    return chat_turns(session, sys.stdin, out, jsonl=jsonl, system=system)
