"""Test setup: 8 simulated CPU devices, set here before anything imports jax (jax#6887: later is ignored)."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data; skipped where absent (a user's clone), a failure in CI (CI=true always has it)."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI") == "true":
      pytest.fail(f"{SHARED_DATA} is missing, and CI must have it")
    pytest.skip(f"{SHARED_DATA} not present (real test data lives beside the repo)")
  return SHARED_DATA
