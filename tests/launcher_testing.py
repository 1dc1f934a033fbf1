"""Shared helpers of the tests that run the launcher as a user does."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def launch(*args, cwd=ROOT, module="experiments.imagenet", timeout=300):
  """Runs `python -m module args...` on the CPU; returns the CompletedProcess."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments):
  """Exit 2, one `error: ...` line on stderr holding `fragments`, no traceback."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: ")
  assert "Traceback" not in proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
