"""Running a multi-device worker script in a fresh process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent


def cpu_env() -> dict[str, str]:
  """This process's environment for a CPU-only child that sets its own XLA_FLAGS."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def force_cpu_devices(count: int = 8) -> None:
  """Makes JAX start ``count`` CPU devices: call before JAX's first use.

  The flag is read when JAX starts its CPU backend (lazily), so a worker
  script calls this in its ``__main__`` block, never on import (pytest's
  doctest collection imports the workers).
  """
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run_json_worker(script: str, timeout: int = 300):
  """Runs ``tests/<script>`` and returns the JSON on its last line of output."""
  proc = subprocess.run(
    [sys.executable, str(TESTS / script)],
    env=cpu_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
