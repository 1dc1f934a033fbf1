"""Runs `python -m MODULE ARGS...` for many ARGS in one interpreter, a fork per run.

  python tests/launch_batch.py REQUEST.json RESULTS.json

REQUEST holds `{"module": ..., "cases": [[arg, ...], ...], "timeout": seconds}`;
RESULTS gets one `{"returncode": ..., "stdout": ..., "stderr": ...}` per case,
in order. Started in the folder the runs should see (`python -m` puts it
first on `sys.path`).

The module (and so jax, flax and haqjax) is imported once; each case then
runs in a forked child, one after another, so it pays none of that import.
The child does what `python -m MODULE` does after its imports: `sys.argv`
is the module's file and the case, `__main__` is the module, and the
module's own `if __name__ == "__main__":` block runs (read from its source),
with fds 1 and 2 going to files of its own. The child then ends as a script
does: `sys.exit`'s code, or an uncaught exception's traceback on stderr and
exit code 1, after the interpreter's normal shutdown. Nothing here parses
flags or starts a JAX backend before the fork, so each child gets unparsed
flags and no devices, as a fresh process does; the flags that the module's
body defined are filed under `sys.argv[0]`, as absl files `__main__`'s.
"""

import ast
import gc
import importlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time


def _main_module(name):
  """The module that `python -m name` runs: `name.__main__` for a package."""
  spec = importlib.util.find_spec(name)
  return f"{name}.__main__" if spec.submodule_search_locations is not None else name


def _main_block(module):
  """The module's `if __name__ == "__main__":` statement, compiled."""
  with open(module.__file__) as f:
    tree = ast.parse(f.read(), module.__file__)
  blocks = [node for node in tree.body if isinstance(node, ast.If)
            and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__")]
  if len(blocks) != 1:
    raise ValueError(f"{module.__file__} has {len(blocks)} `if __name__ == '__main__'` blocks")
  return compile(ast.Module(body=blocks, type_ignores=[]), module.__file__, "exec")


def _child(module, block, args, out, err):
  """Runs the case in this (forked) process; ends the process as a script ends."""
  for fd, path in ((1, out), (2, err)):
    file_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(file_fd, fd)
    os.close(file_fd)
  sys.argv = [module.__file__, *args]
  sys.modules["__main__"] = module
  _flags_to_main(module.__name__, module.__file__)
  namespace = vars(module)
  namespace["__name__"] = "__main__"
  exec(block, namespace)  # pylint: disable=exec-used
  sys.exit(0)  # The block returned: the script's end.


def _flags_to_main(name, path):
  """Gives the flags that module `name` defined to `path`, as absl does for `__main__`.

  absl files a flag under its defining module's name, and `__main__`'s under
  `sys.argv[0]`; `--help` lists the main module's flags.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  for by_module in (flags.FLAGS.flags_by_module_dict(), flags.FLAGS.key_flags_by_module_dict()):
    if name in by_module:
      by_module[path] = by_module.pop(name)


def _wait(pid, timeout):
  """The child's exit code as `subprocess` gives it (-N for signal N); killed after timeout."""
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.kill(pid, signal.SIGKILL)
      return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    time.sleep(0.005)


def _read(path):
  with open(path, errors="replace") as f:
    return f.read()


def main(request_path, results_path):
  with open(request_path) as f:
    request = json.load(f)
  sys.path[0] = os.getcwd()  # As `python -m` has it, not this file's folder.
  module = importlib.import_module(_main_module(request["module"]))
  block = _main_block(module)
  folder = tempfile.mkdtemp(prefix="launch_batch")
  gc.freeze()  # The children's collections then leave the shared pages unwritten.
  results = []
  for i, args in enumerate(request["cases"]):
    out, err = os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(module, block, args, out, err)  # Never returns: exits or raises to the top.
    code = _wait(pid, request["timeout"])
    results.append({"returncode": code, "stdout": _read(out), "stderr": _read(err)})
    os.remove(out)
    os.remove(err)
  os.rmdir(folder)
  with open(results_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
