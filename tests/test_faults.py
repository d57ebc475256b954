"""Faults end to end: signals at every phase, a second SIGINT, a full disk,
a read-only workdir, unreadable weights files. Each gives exit 0 with the
right records, or one line with the way out, and loses nothing."""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import pytest

from discrim_jax import pretrained
from discrim_jax import train
from discrim_jax import checkpoints
from discrim_jax import evaluation

REPO = Path(__file__).resolve().parents[1]
_SMOKE = ["--config=experiments/configs/fashion_mnist.py:smoke",
          "--config.num_devices=1"]


def _cli(workdir, *extra, **kwargs):
  return subprocess.Popen(
      [sys.executable, "experiments/train.py", *_SMOKE, f"--workdir={workdir}",
       *extra], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
      stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith(("error:", "preempted:"))]


# Each phase entered through the public function it starts with: restoring
# (or initialising) the state (discrim_jax.checkpoints), the last step, and
# the test, whose pass over the test split (discrim_jax.evaluation) follows
# the restore of the best checkpoint where that is not the last step's.
@pytest.mark.parametrize("phase", ["restore_latest", "last_step", "test"])
def test_sigterm_at_each_phase_then_resume_equals_uninterrupted(
    phase, whole, fashion, tmp_path, smoke_config, read_metrics, monkeypatch):
  config = smoke_config()
  kwargs = {}
  if phase == "last_step":
    kwargs["step_callback"] = lambda step: step == 10 and os.kill(os.getpid(),
                                                                  signal.SIGTERM)
    where = "at step 10 of 10"
  elif phase == "test":
    original = evaluation.split_totals

    def signalled(program, state, split, *args):
      if split == "test":
        os.kill(os.getpid(), signal.SIGTERM)
      return original(program, state, split, *args)
    monkeypatch.setattr(evaluation, "split_totals", signalled)
    where = "during the test"
  else:
    original = checkpoints.restore_latest

    def signalled(*args):
      os.kill(os.getpid(), signal.SIGTERM)
      return original(*args)
    monkeypatch.setattr(checkpoints, "restore_latest", signalled)
    where = "before training started"
  run = tmp_path / "cut"
  with pytest.raises(train.Preempted, match=f"SIGTERM {where}"):
    train.train_and_evaluate(config, str(run), dataset=fashion, **kwargs)
  assert not (run / "summary.json").exists()
  monkeypatch.undo()
  summary = train.train_and_evaluate(config, str(run), dataset=fashion)
  assert read_metrics(run) == whole
  if phase != "restore_latest":  # trained before the stop: its rate is kept
    assert summary["train_images_per_s"] is not None


def test_second_sigint_stops_at_once_in_one_line(tmp_path):
  proc = _cli(tmp_path / "run", "--config.num_epochs=50", "--config.log_every_steps=1")
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, "the run did not start"
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode in (75, 130), stderr[-2000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  if proc.returncode == 130:
    assert "stopped at once by a second SIGINT" in stderr.strip().splitlines()[-1]


def _mount(path: Path, *options) -> None:
  path.mkdir(parents=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")


def test_full_disk_is_one_line_and_keeps_what_was_saved(tmp_path):
  disk = tmp_path / "disk"
  _mount(disk, "size=1m")
  try:
    proc = _cli(disk / "run", "--config.num_epochs=2")
    _, stderr = proc.communicate(timeout=300)
  finally:
    subprocess.run(["umount", str(disk)], check=False)
  assert proc.returncode == 1, stderr[-2000:]
  lines = _error_lines(stderr)
  assert len(lines) == 1 and "No space left on device" in lines[0], stderr[-3000:]
  assert "Traceback" not in stderr and "Logging error" not in stderr
  assert len(stderr.splitlines()) < 20, stderr[-3000:]


def test_read_only_and_file_workdirs_are_one_line(tmp_path):
  ro = tmp_path / "ro"
  _mount(ro, "size=1m", "ro")
  try:
    proc = _cli(ro / "run")
    _, stderr = proc.communicate(timeout=300)
  finally:
    subprocess.run(["umount", str(ro)], check=False)
  assert proc.returncode == 1 and len(_error_lines(stderr)) == 1, stderr[-2000:]
  assert "Read-only file system" in _error_lines(stderr)[0]
  assert "choose a --workdir (and data folder) you can write to" in stderr
  assert "Traceback" not in stderr
  (tmp_path / "file").write_text("x")
  proc = _cli(tmp_path / "file")
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 1 and "is a file, not a folder" in stderr, stderr[-2000:]
  assert len(stderr.strip().splitlines()) == 1


def test_unreadable_weights_are_one_line_never_suggesting_unsafe_loading(tmp_path):
  torch = pytest.importorskip("torch", reason="the pretrained extra (make test)")
  del torch
  import pickle  # pylint: disable=g-import-not-at-top

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'ran'}",))
  (tmp_path / "evil.pth").write_bytes(pickle.dumps({"w": Payload()}))
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  for name in ("junk.pth", "missing.pth"):  # the reader itself
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      pretrained.load_state_dict(tmp_path / name)
    assert "weights_only=False" not in str(e.value) and name in str(e.value)
    assert "\n" not in str(e.value)
  for name in ("evil.pth",):  # and through the command, as a user meets it
    proc = subprocess.Popen(
        [sys.executable, "experiments/convert.py", "--model=resnet18",
         f"--checkpoint={tmp_path / name}", f"--out={tmp_path / 'out'}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    assert "weights_only=False" not in stderr and name in stderr
  assert not (tmp_path / "ran").exists()
  assert not (tmp_path / "out").exists()


def test_two_processes_on_one_workdir_and_writes_only_there(tmp_path,
                                                            fashion_data_dir):
  """Two real runs on one workdir: the second refuses in one line before
  touching a file, the first finishes with its records once each. The run
  writes only inside its workdir, the data folder and the compilation cache
  (HOME and the working directory are empty folders here; the data folder
  holds a copy of the Fashion-MNIST the session prepared from the Debian
  files, as `make data` leaves it)."""
  shutil.copytree(fashion_data_dir, tmp_path / "tfds")
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  home.mkdir()
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(home),
             DISCRIM_JAX_CACHE=str(tmp_path / "cache"))
  for name in ("JAX_COMPILATION_CACHE_DIR",  # the app's own cache, not the suite's
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    env.pop(name, None)
  argv = [sys.executable, str(REPO / "experiments" / "train.py"),
          "--config=" + str(REPO / "experiments/configs/fashion_mnist.py:smoke"),
          "--config.num_devices=1", f"--config.data_dir={tmp_path / 'tfds'}",
          f"--workdir={tmp_path / 'run'}"]
  first = subprocess.Popen(argv, cwd=cwd, env=env, stderr=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (tmp_path / "run" / ".lock").exists():
    assert first.poll() is None and time.time() < deadline, first.stderr.read()
    time.sleep(0.1)
  before = sorted(p.name for p in (tmp_path / "run").iterdir())
  second = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert second.returncode == 1
  lines = _error_lines(second.stderr)
  assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], second.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) >= before
  _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-2000:]
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)) and keys[-1][1] == "test"
  assert not (tmp_path / "run" / ".lock").exists()
  assert list(cwd.iterdir()) == []
  outside = [p for p in home.rglob("*") if p.is_file()]
  assert outside == [], outside[:5]
  assert set(p.name for p in tmp_path.iterdir()) == {"home", "cwd", "run", "tfds",
                                                     "cache"}
  assert {p.name for p in (tmp_path / "cache").iterdir()} <= {
      "jax_cache", "keras", "matplotlib"}
