"""Sampling from a trained decoder: prefill the prompt into a KV cache, then one jitted loop of decode steps."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterable
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import generation, run, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import chat
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models.decoder import Decoder, DecoderConfig


def load_config_for_sampling(workdir: str, overrides=()):
  return config_lib.apply_overrides(run.read_config(workdir), overrides)


def _pick(logits, rng, temperature: float, top_k: int):
  """logits [B, V] -> next token ids [B]: greedy at temperature 0, else top-k filtered sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def sample(model: Decoder, params, prompt, rng, *, max_new_tokens: int, temperature: float, top_k: int):
  """prompt [B, P] int32 -> generated ids [B, max_new_tokens]."""
  b, p = prompt.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, 1), jnp.int32), decode=True)["cache"]
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  ones = jnp.ones((b, p), jnp.int32)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, positions, ones, decode=True,
                                  mutable=["cache"])
  first = _pick(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)

  def body(i, carry):
    out, cache = carry
    token = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]: the token chosen last
    pos = jnp.full((b, 1), p + i - 1, jnp.int32)
    logits, variables = model.apply({"params": params, "cache": cache}, token, pos, jnp.ones((b, 1), jnp.int32),
                                    decode=True, mutable=["cache"])
    nxt = _pick(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k)
    return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1), variables["cache"]

  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, variables["cache"]))
  return out


def load_params(config, workdir: str, tokenizer=None):
  """The model and the best-or-latest checkpoint's parameters, on the run's mesh; `tokenizer`, if given, must be the
  one the checkpoint was trained with."""
  setup = train.build(config)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = run.restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()
  return setup.task.model, params, step


def generate_text(config, workdir: str, prompt: str) -> str:
  tokenizer = load_tokenizer(config, workdir)
  model, params, _ = load_params(config, workdir, tokenizer)
  ids = tokenizer.encode(prompt)
  if not ids:
    ids = [tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id]
  s = config.sample
  max_len = DecoderConfig.from_config(config.model).max_len
  if len(ids) + s.max_new_tokens > max_len:
    raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds model.max_len={max_len}")
  out = sample(model, params, jnp.asarray([ids], jnp.int32), jax.random.key(s.seed),
               max_new_tokens=s.max_new_tokens, temperature=float(s.temperature), top_k=int(s.top_k))
  new = [int(t) for t in np.asarray(out[0])]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(ids + new)  # decoding the whole sequence keeps the spacing between prompt and sample


# ---- chat: a decoder answering conversations in its workdir's chat template (task.name=sft) -------------------------


class ChatSession:
  """A workdir's decoder replying to conversations written in the workdir's chat template (data.chat_*), with the
  sample.* settings; a reply ends at the end marker. The history is cut from the left at turn boundaries
  (chat.truncate) so that it and max_new_tokens fit in model.max_len."""

  def __init__(self, config, workdir: str):
    if config.model.family != "decoder":
      raise ValueError(f"--chat needs a decoder; {workdir} holds a model.family='{config.model.family}' model")
    self.tokenizer = load_tokenizer(config, workdir)
    run.check_vocab(config, self.tokenizer)
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
                                   eos_id=end_id, pad_id=pad_id)
    else:
      rng = jax.random.fold_in(jax.random.key(int(s.seed)), self.replies)
      out = generation.sample(self.decoding, self.params, prompt, lengths, max_new_tokens=int(s.max_new_tokens),
                              rng=rng, temperature=float(s.temperature), top_p=float(s.top_p),
                              top_k=min(int(s.top_k), self.model.cfg.vocab_size),  # k >= vocabulary: no filter
                              eos_id=end_id, pad_id=pad_id)
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
