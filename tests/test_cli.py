"""The absl entry point experiments/train.py as a user meets it: one-line
errors, exit statuses, SIGTERM."""

import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import time


from discrim_jax import train

REPO = Path(__file__).resolve().parents[1]


def test_cli_sigterm_saves_and_exits_75_with_one_line(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "experiments" / "train.py"),
       "--config=experiments/configs/fashion_mnist.py:smoke",
       f"--workdir={workdir}", "--config.num_epochs=50",
       "--config.log_every_steps=1", "--config.num_devices=1"],
      cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, "the run did not start"
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 75, stderr[-2000:]
  lines = [l for l in stderr.splitlines() if l.startswith("preempted:")]
  assert len(lines) == 1 and "rerun the same command to resume" in lines[0]
  assert "Traceback" not in stderr
  step = int(lines[0].split(" at step ")[1].split()[0])
  assert str(step) in [p.name for p in (workdir / "checkpoints").iterdir()]
  # The console has the progress lines; absl's INFO records go to log.txt.
  absl_info = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", re.M)
  assert not absl_info.search(stderr), stderr[-2000:]
  # Nor TensorFlow's notes on loading (oneDNN on, absl not initialised).
  assert "oneDNN" not in stderr and "InitializeLog" not in stderr, stderr[:2000]
  assert absl_info.search((workdir / "log.txt").read_text())
  assert re.search(r"^gini_kl seed 0: step \d+/500", stderr, re.M), stderr[-2000:]


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(REPO / "experiments" / "train.py"), *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_value_is_one_line_error(tmp_path):
  result = _cli("--config=experiments/configs/fashion_mnist.py:smoke",
                f"--workdir={tmp_path}", "--config.model=resnet99")
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors and "unknown model 'resnet99'" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_cli_unreadable_checkpoint_is_one_line_without_tracebacks(
    corrupt_checkpoint, fashion, smoke_config, tmp_path):
  # The run itself in this process, with the config the other tests build
  # (the CLI's part is the failing reruns, with the same fields as flags).
  config = smoke_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path), dataset=fashion)
  args = ("--config=experiments/configs/fashion_mnist.py:smoke",
          f"--workdir={tmp_path}", "--config.num_epochs=1",
          *(f"--config.{field}={config[field]}" for field in (
              "num_devices", "train_subset", "eval_subset", "eval_batch_size",
              "log_every_steps")))
  (tmp_path / "summary.json").unlink()
  assert corrupt_checkpoint(tmp_path / "checkpoints" / "5", "manifest")
  for expected in ("step 5 \\(moved to", "unreadable ones were moved to"):
    result = _cli(*args)
    assert result.returncode == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_cli_missing_config_file_is_one_line_listing_the_configs(tmp_path):
  for args in (("--config=experiments/configs/nope.py:smoke",),
               ("--config", "experiments/configs/nope.py")):
    result = _cli(*args, f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "error: --config=experiments/configs/nope.py"), result.stderr
    assert "no such file" in result.stderr and (
        "experiments/configs/fashion_mnist.py" in result.stderr)
  assert not (tmp_path / "run").exists()


def test_cli_unknown_field_is_rejected(tmp_path):
  result = _cli("--config=experiments/configs/fashion_mnist.py:smoke",
                f"--workdir={tmp_path}", "--config.modle=resnet18")
  assert result.returncode != 0
  assert "modle" in result.stderr and "Traceback" not in result.stderr
