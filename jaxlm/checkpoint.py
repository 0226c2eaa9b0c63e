"""The one Orbax wrapper: the train state, the data-iterator state, the resolved config and metadata are saved
and restored together, as items of one checkpoint step."""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm import config as config_lib

ITEMS = ("state", "data", "config", "metadata")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep if ckpt_cfg.keep > 0 else None,
        keep_period=ckpt_cfg.keep_every or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=ITEMS,
        item_handlers={"data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, config, metadata: dict, *, force: bool = False) -> bool:
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(config.to_dict()),
        "metadata": ocp.args.JsonSave(metadata),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings in `abstract_state` (any mesh), and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_config(self, step: int):
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_lib.from_json_dict(restored["config"])

  def restore_params(self, step: int, abstract_params):
    """Parameters only (for eval, sampling and fine-tuning), onto the given shardings."""
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract_params},
        restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), {"params": abstract_params}),
        partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
