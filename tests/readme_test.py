"""README.md gives two fresh-machine commands; .ci/run runs the test one."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
  commands = _readme_commands()
  assert len(commands) == 2
  main_job, tests = commands
  assert "python -m experiments.imagenet --flagfile=experiments/flags/quickstart_rl.flags" in main_job
  assert "pytest" in tests
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci_lines = [line.strip() for line in f]
  assert tests.strip() in ci_lines


def test_readme_recipes_exist():
  flags_dir = os.path.join(ROOT, "experiments", "flags")
  for recipe in ("quickstart", "quickstart_rl", "quickstart_qat", "digits", "cifar10_resnet20",
                 "imagenet_mobilenet_v2", "imagenet_resnet50"):
    assert os.path.exists(os.path.join(flags_dir, f"{recipe}.flags")), recipe
