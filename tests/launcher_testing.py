"""Shared helpers of the tests that run the launcher as a user does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def launch(*args, cwd=ROOT, module="experiments.imagenet", timeout=300):
  """Runs `python -m module args...` on the CPU; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def launch_ok(*args, module="experiments.imagenet", timeout=300):
  """`launch`, asserting exit 0 (stderr's tail in the message)."""
  proc = launch(*args, module=module, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def digits_fp32(tmp_path_factory, name):
  """Digits flags for a test module that searches, and its folder.

  Makes a folder `name` with the prepared data and a compilation cache that
  the module's runs share, trains a 2-epoch FP32 model in its `fp32`, and
  returns `(flags, folder)`: the flags every later run shares, with
  `--init_from` that model (without `--mode` and `--workdir`).
  """
  tmp = tmp_path_factory.mktemp(name)
  flags = ["--flagfile=experiments/flags/digits.flags", f"--data_dir={tmp / 'data'}",
           f"--compilation_cache={tmp / 'jit'}", "--noprogress", "--notensorboard"]
  launch_ok(*flags, f"--workdir={tmp / 'fp32'}", "--epochs=2")
  return [*flags, f"--init_from={tmp / 'fp32'}"], tmp


def without_seconds(records):
  """Records without their wall-time field, for comparing runs."""
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def jsonl_lines(path):
  """The complete (newline-terminated) lines of a JSON-lines file, parsed."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return [json.loads(l) for l in text.split("\n")[:-1]]


def kill_after(args, path, lines, delay, module="experiments.imagenet", timeout=240):
  """Runs `python -m module args...`; SIGKILLs it `delay` s after `path` has `lines` lines.

  The whole process group is killed. Returns the complete records in `path`
  at the moment of the kill.
  """
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True)
  try:
    deadline = time.monotonic() + timeout
    while len(jsonl_lines(path)) < lines:
      if proc.poll() is not None:
        pytest.fail(f"the run exited ({proc.returncode}) before {lines} lines in {path}: "
                    f"{proc.stderr.read().decode()[-3000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"no {lines} lines in {path} within {timeout} s")
      time.sleep(0.02)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    seen = jsonl_lines(path)  # Nothing writes any more.
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  return seen


def assert_one_line_error(proc, *fragments):
  """Exit 2, one `error: ...` line on stderr holding `fragments`, no traceback."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: ")
  assert "Traceback" not in proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
