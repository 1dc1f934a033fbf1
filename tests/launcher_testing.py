"""Shared helpers of the tests that run the launcher as a user does."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


def launch_many(cases, cwd=ROOT, module="experiments.imagenet", timeout=300):
  """`launch` of each case (a list of args); one CompletedProcess per case, in order.

  For runs that end early (bad input): one interpreter imports `module` once
  and runs the cases one after another, each in a forked child that starts
  where `python -m module` would after its imports (`launch_batch.py`), with
  its own argv, stdout, stderr and exit code. `timeout` is per case.
  """
  cases = [[str(a) for a in case] for case in cases]
  with tempfile.TemporaryDirectory() as folder:
    request, results = os.path.join(folder, "request.json"), os.path.join(folder, "results.json")
    with open(request, "w") as f:
      json.dump({"module": module, "cases": cases, "timeout": timeout}, f)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "launch_batch.py"), request, results],
        cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=60 + timeout * len(cases))
    assert proc.returncode == 0 and os.path.exists(results), proc.stderr[-3000:]
    with open(results) as f:
      done = json.load(f)
  return [subprocess.CompletedProcess([sys.executable, "-m", module, *case], r["returncode"],
                                      r["stdout"], r["stderr"])
          for case, r in zip(cases, done, strict=True)]


def launch_ok(*args, module="experiments.imagenet", timeout=300):
  """`launch`, asserting exit 0 (stderr's tail in the message)."""
  proc = launch(*args, module=module, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def hold_folder(directory, holder="pid 4242"):
  """Another process's hold on `directory` (`haqjax.io.claim`), as an open file.

  flock locks belong to open files, so this one refuses the test's own
  process too until it is closed.
  """
  from haqjax import io as haq_io  # pylint: disable=g-import-not-at-top
  path = haq_io.lock_path(directory)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  held = open(path, "w")  # pylint: disable=consider-using-with
  fcntl.flock(held, fcntl.LOCK_EX)
  held.write(holder)
  held.flush()
  return held


def _shared_root(tmp_path_factory):
  """A folder every test module of this pytest run sees, xdist workers included."""
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's basetemp is a child of the run's own folder.
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _read_only(folder):
  """Takes the write permission off `folder` and everything in it."""
  for root, dirs, files in os.walk(folder):
    for name in files:
      os.chmod(os.path.join(root, name), 0o444)
    os.chmod(root, 0o555)


def _flags(root):
  return ["--flagfile=experiments/flags/digits.flags", f"--data_dir={root / 'data'}",
          f"--compilation_cache={root / 'jit'}", "--noprogress", "--notensorboard"]


def shared_flags(tmp_path_factory):
  """Digits flags with the prepared data and compilation cache of the pytest run.

  Every test module of the run (every xdist worker) gets the same folders, so
  the data is prepared once and a function compiled by one run is read back
  by the others. The data is prepared (by `shared_digits`) before this
  returns, so no two runs prepare it at once. Without `--mode`, `--workdir`
  and `--init_from`.
  """
  return shared_digits(tmp_path_factory)[0]


def shared_digits(tmp_path_factory):
  """`shared_flags` and the 2-epoch FP32 model that every module of the run shares.

  The first caller (under an exclusive file lock, so one xdist worker trains
  while the others wait) prepares the data and trains the model; later
  callers reuse both. The model's folder is made read-only, so that a run
  writing into its `--init_from` fails (for a user other than root).

  Returns:
    `(flags, fp32)`: `shared_flags` and the FP32 run's folder.
  """
  root = _shared_root(tmp_path_factory) / "digits_shared"
  root.mkdir(exist_ok=True)
  flags = _flags(root)
  fp32, done = root / "fp32", root / "fp32.done"
  with open(root / "fp32.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      if fp32.exists():  # A training that failed or was killed: start over.
        shutil.rmtree(fp32)
      launch_ok(*flags, f"--workdir={fp32}", "--epochs=2")
      _read_only(fp32)
      done.touch()
  return flags, fp32


def digits_fp32(tmp_path_factory, name):
  """Digits flags for a test module that searches, and its folder.

  Makes a fresh folder `name` for the module's runs and returns
  `(flags, folder)`: the flags every later run shares (without `--mode` and
  `--workdir`), with the prepared data, compilation cache and `--init_from`
  2-epoch FP32 model of `shared_digits`, made once per pytest run.
  """
  flags, fp32 = shared_digits(tmp_path_factory)
  return [*flags, f"--init_from={fp32}"], tmp_path_factory.mktemp(name)


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
