"""The optimiser from config: AdamW (or T5's Adafactor) with warmup + cosine/linear/rsqrt decay and an optional final
cooldown, a weight-decay mask, global-norm clipping; frozen parameters (jaxlm/peft.py) get neither updates nor optimiser
state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm import peft

NO_DECAY_NAMES = ("scale", "bias", "bi", "bo")  # norm scales and biases are never decayed


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  peak = optim_cfg.learning_rate
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  end = peak * optim_cfg.end_lr_fraction
  decay_steps = max(total_steps - warmup, 1)
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.end_lr_fraction)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim_cfg.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif optim_cfg.schedule == "rsqrt":
    # inverse square root (the Transformer's "Noam" schedule): peak at the end of warmup, then peak * sqrt(w / step)
    w = max(warmup, 1)
    decay = lambda count: peak * jax.lax.rsqrt((count + w) / w)
  else:
    raise ValueError(f"optim.schedule must be cosine, linear, constant or rsqrt; got '{optim_cfg.schedule}'")
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup]) if warmup else decay
  cooldown = round(optim_cfg.cooldown_fraction * total_steps)
  if not cooldown:
    return schedule
  # warmup-stable-decay style: the last `cooldown` steps scale the rate linearly down to 1/cooldown of it, so a run
  # whose length is known ends annealed (an rsqrt run otherwise stops at peak * sqrt(warmup / steps))
  return lambda count: schedule(count) * jnp.clip((total_steps - count) / cooldown, 0.0, 1.0)


def decay_mask(params, decay_embeddings: bool):
  """True where weight decay applies: matrices, and embedding tables only if asked."""
  def decide(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in NO_DECAY_NAMES or name.endswith("_bias"):
      return False
    if "embedding" in name:
      return decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_cfg, total_steps: int, trainable=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW or Adafactor (+ clipping) over the parameters; with a `trainable` mask (peft.trainable_mask), over the
  trained ones only: the frozen partition is set to zero and, being masked out of the optimiser, holds no moments.
  Clipping sees the trained gradients only."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  mask = lambda p: decay_mask(p, optim_cfg.decay_embeddings)
  if optim_cfg.name == "adafactor":
    # T5's settings (optax's defaults): second moments factored into row and column means for matrices whose two
    # largest dims are >= 128, decay 1 - step**-0.8, updates clipped to RMS 1 and scaled by the tensor's RMS (so a
    # unit-variance embedding moves as fast, relative to its size, as a small projection); no first moment
    parts.append(optax.adafactor(schedule, weight_decay_rate=optim_cfg.weight_decay or None, weight_decay_mask=mask))
  elif optim_cfg.name == "adamw":
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=mask))
  else:
    raise ValueError(f"optim.name must be adamw or adafactor; got '{optim_cfg.name}'")
  tx = optax.chain(*parts)
  if trainable is not None:
    tx = optax.partition({peft.TRAINED: tx, peft.FROZEN: optax.set_to_zero()},
                         functools.partial(peft.labels, trainable))
  return tx, schedule
