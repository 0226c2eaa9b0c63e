"""Tasks: one object per training objective, giving the train loop its model, loss and metrics.

Every task has the same shape, so the train step stays one function whatever is trained:
  task.model                                  a flax.linen Module
  task.dummy_batch(batch_size, seq_len)       numpy arrays with the batch's names, shapes and dtypes (for init)
  task.init_params(rng, batch)                boxed (logically partitioned) parameters
  task.loss_fn(params, batch, rng, train)     (loss, stats); stats maps a name to (sum, count) so the loop
                                              can average over micro-batches, eval batches and hosts exactly
  task.predict_fn(params, batch)              jittable predictions for host-side metrics (may be None)
  task.host_metrics(pairs)                    metrics computed on the host after an eval pass (may return {})
  task.eval_splits                            the split(s) evaluated during training ("eval"; "dev" for fine-tuning)
  task.test_split                             the split evaluated once at the end with the best checkpoint, or None
"""

from __future__ import annotations


def fine_tuning_splits(config) -> tuple[tuple[str, ...], str | None]:
  """A fine-tuning task's splits: dev during training, and test at the end when the config names one."""
  d = config.data
  has_test = bool(d.tfds_test_split if d.source == "tfds" else d.test_files)
  return ("dev",), ("test" if has_test else None)


def make_task(config):
  """The task named by config.task.name."""
  name = config.task.name
  if name == "lm":
    from jaxlm.tasks import lm
    return lm.LMTask(config)
  known = {
      "classification": ("jaxlm.tasks.classification", "ClassificationTask"),
      "ner": ("jaxlm.tasks.ner", "NerTask"),
      "qa": ("jaxlm.tasks.qa", "QATask"),
      "mlm_nsp": ("jaxlm.tasks.mlm_nsp", "MlmNspTask"),
  }
  if name not in known:
    raise ValueError(f"task.name='{name}' is not a task; known: lm, {', '.join(known)}")
  import importlib
  module_name, class_name = known[name]
  return getattr(importlib.import_module(module_name), class_name)(config)
