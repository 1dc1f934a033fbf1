"""The launcher as a user runs it: exit codes, one-line errors, a real run."""

import json
import os
import re
import signal

import pytest
from launcher_testing import hold_folder
from launcher_testing import launch
from launcher_testing import launch_many
from launcher_testing import assert_one_line_error


@pytest.fixture
def digits_args(tmp_path):
  return ["--flagfile=experiments/flags/digits.flags", f"--data_dir={tmp_path / 'data'}",
          f"--workdir={tmp_path / 'run'}", "--compilation_cache=", "--noprogress"]


_BAD_FLAGS = [
    ("--batch_size=-8", ("batch_size=-8", "> 0")),
    ("--batch_size=abc", ("batch_size", "abc")),
    ("--dataset=mnist3d", ("dataset 'mnist3d' is unknown", "digits")),
    ("--model=vgg99", ("model 'vgg99' is unknown", "digits_cnn")),
    ("--optimizer=lion", ("optimizer='lion'", "sgd, adamw")),
    ("--mode=qat", ("needs a policy",)),
    ("--mode=qat --policy=w4a12", ("a bits 12 is outside 1..8",)),
    ("--nosuchflag=1", ("nosuchflag",)),
]


def _digits_args(folder):
  return ["--flagfile=experiments/flags/digits.flags", f"--data_dir={folder / 'data'}",
          f"--workdir={folder / 'run'}", "--compilation_cache=", "--noprogress"]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
  """The module's bad-input launches, in one `launch_many`: `(name -> process, folder)`.

  Each case has a folder of its own under `folder`.
  """
  root = tmp_path_factory.mktemp("bad_input")
  cases = {flag: [*_digits_args(root / f"flags{i}"), *flag.split()]
           for i, (flag, _) in enumerate(_BAD_FLAGS)}
  cases["missing_workdir"] = ["--flagfile=experiments/flags/digits.flags"]
  manual = root / "cifar10" / "empty"
  manual.mkdir(parents=True)
  cases["missing_data"] = ["--dataset=cifar10", "--model=resnet20", f"--manual_dir={manual}",
                           f"--data_dir={root / 'cifar10' / 'data'}",
                           f"--workdir={root / 'cifar10' / 'run'}"]
  policy = root / "policy" / "p.json"
  policy.parent.mkdir()
  policy.write_text(json.dumps({"layers": [{"w_bits": 4, "a_bits": 4}] * 2}))
  cases["policy"] = [*_digits_args(root / "policy"), "--mode=qat", f"--policy={policy}"]
  cases["busy"] = _digits_args(root / "busy")
  with hold_folder(root / "busy" / "run"):  # Another run holds the busy case's --workdir.
    procs = launch_many(cases.values())
  return dict(zip(cases, procs)), root


@pytest.mark.parametrize("flag, fragments", _BAD_FLAGS)
def test_bad_flags(bad_input, flag, fragments):
  assert_one_line_error(bad_input[0][flag], *fragments)


def test_missing_workdir(bad_input):
  assert_one_line_error(bad_input[0]["missing_workdir"], "--workdir is required")


def test_missing_data_names_place_and_command(bad_input):
  procs, root = bad_input
  assert_one_line_error(procs["missing_data"], "cifar10", str(root / "cifar10" / "empty"),
                        "cifar-10-python.tar.gz")


def test_a_workdir_in_use_is_refused_and_left_alone(bad_input):
  procs, root = bad_input
  assert_one_line_error(procs["busy"], f"workdir={root / 'busy' / 'run'} is in use by another "
                        "run (pid 4242)", "allowed: one run per folder at a time")
  assert not (root / "busy" / "run").exists()


def test_policy_json_with_wrong_layer_count(bad_input):
  procs, root = bad_input
  assert_one_line_error(procs["policy"], str(root / "policy" / "p.json"),
                        "has 2 layers; the model has")


_FAKE_LAUNCHER = '''
import sys
import time


def main(argv):
  print("out", *argv[1:])
  if argv[1] == "raise":
    raise RuntimeError("boom")
  if argv[1] == "sleep":
    time.sleep(60)
  print("err", argv[0].endswith("fake_launcher.py"), __name__, file=sys.stderr)
  sys.exit(int(argv[1]))


if __name__ == "__main__":
  main(sys.argv)
'''


def test_launch_many_gives_each_case_its_own_exit_code_and_output(tmp_path):
  (tmp_path / "fake_launcher.py").write_text(_FAKE_LAUNCHER)
  cases = [["0"], ["2"], ["raise"], ["sleep"], ["3"]]
  procs = launch_many(cases, cwd=tmp_path, module="fake_launcher", timeout=2)
  assert [p.returncode for p in procs] == [0, 2, 1, -signal.SIGKILL, 3]
  assert [p.stdout for p in procs[:3]] == ["out 0\n", "out 2\n", "out raise\n"]
  assert procs[4].stdout == "out 3\n"
  assert procs[1].stderr == "err True __main__\n"
  assert "Traceback" in procs[2].stderr and procs[2].stderr.endswith("RuntimeError: boom\n")
  for case, proc in zip(cases, procs):
    if case != ["sleep"]:
      alone = launch(*case, cwd=tmp_path, module="fake_launcher")
      assert alone.returncode == proc.returncode and alone.stdout == proc.stdout
      if case != ["raise"]:  # A traceback's outer frames differ.
        assert alone.stderr == proc.stderr


def test_digits_run_then_flag_override_and_corrupt_checkpoint(tmp_path, digits_args):
  proc = launch(*digits_args, "--epochs=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["dataset"] == "digits" and summary["test_top1"] > 60
  run = tmp_path / "run"
  config = json.loads((run / "config.json").read_text())
  assert config["epochs"] == 2 and config["model"] == "digits_cnn"  # The override won.
  results = (run / "results.json").read_text()
  # Corrupt the newest checkpoint: a rerun fails cleanly and loses nothing.
  steps = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
  for root, _, files in os.walk(run / "checkpoints" / str(steps[-1])):
    for f in files:
      if not f.endswith(".txt"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\x00garbage")
  proc = launch(*digits_args, "--epochs=2")
  assert_one_line_error(proc, "checkpoint", "cannot be read")
  assert (run / "results.json").read_text() == results


def test_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, digits_args):
  # The warm-up ramps the learning rate to 200 over 20 epochs: the first epochs
  # (lr <= 20, lr * weight_decay <= 2) are stable, then SGD with momentum
  # 0.9 grows the weights geometrically once lr * weight_decay > 2 * 1.9.
  proc = launch(*digits_args, "--epochs=20", "--warmup_epochs=20", "--schedule=constant",
                "--learning_rate=200", "--weight_decay=0.1", "--log_every_steps=5")
  assert_one_line_error(proc, "training diverged", "is kept")
  line = proc.stderr.strip()
  m = re.search(r"at step (\d+)\b.*the last good checkpoint (\S+) is kept$", line)
  assert m, line
  step, kept = int(m.group(1)), m.group(2)
  checkpoints = tmp_path / "run" / "checkpoints"
  saved = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert kept == str(checkpoints / str(saved[-1])) and saved[-1] < step, (line, saved)
  from haqjax.train import Checkpointer  # pylint: disable=g-import-not-at-top
  from haqjax.train import divergence  # pylint: disable=g-import-not-at-top
  state, _ = Checkpointer(tmp_path / "run", create=False).restore()
  assert bool(divergence.all_finite(state))  # Never overwritten by a NaN state.
  assert not (tmp_path / "run" / "results.json").exists()


def test_bench_rejects_unknown_benchmark():
  proc = launch("nope", module="experiments.bench")
  assert_one_line_error(proc, "benchmark name is 'nope'", "train")
