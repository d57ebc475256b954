"""Preparing a TFDS data set on disk: once per folder, whichever process
or host gets there first (the others wait on a lock, then read what it
wrote), and failing within seconds in one line, saying how to get the data,
when it is neither prepared nor downloadable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
from typing import Any

from discrim_jax.data.tfds_access import mocked


def network_available(host: str = "storage.googleapis.com", port: int = 443,
                      timeout: float = 5.0) -> str | None:
  """None when ``host`` answers within ``timeout`` seconds, else why not."""
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return None
  except OSError as e:
    return f"{host}:{port} unreachable: {e}"


def prepare(builder: Any, name: str, *, download: bool,
            file_format: str | None = None) -> None:
  """Prepares a TFDS data set where it is not yet, failing within seconds
  with one line (what was searched, how to get the data) when it is neither
  prepared nor downloadable."""
  if builder.is_prepared():
    return
  with _one_preparer(builder):
    if builder.is_prepared():  # another process prepared it while we waited
      builder.info.read_from_directory(builder.data_dir)
      return
    _prepare(builder, name, download=download, file_format=file_format)


@contextlib.contextmanager
def _one_preparer(builder: Any):
  """Holds a lock per prepared folder: two runs starting together (a
  sharded study, two seeds) would otherwise both prepare it, and the
  second's rename onto the first's folder fails. The lock file lives in the
  data folder's root, so that every process preparing that folder sees it,
  whatever its temporary folder (a SLURM job's own TMPDIR) or host (a root
  shared over NFS, where flock is honoured); where the root is not a local
  folder (gs://...) or takes no lock, it lives in the temporary folder, which
  covers the processes of one host that share it."""
  name = ("discrim_jax_prepare_"
          f"{hashlib.sha256(str(builder.data_dir).encode()).hexdigest()[:16]}.lock")
  root = str(builder.data_dir_root)
  places = ([] if "://" in root else [(root, "." + name)]) + [
      (tempfile.gettempdir(), name)]
  for folder, file_name in places:
    try:
      os.makedirs(folder, exist_ok=True)
      lock = open(os.path.join(folder, file_name), "a")  # pylint: disable=consider-using-with
    except OSError:
      continue
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    except OSError:  # a file system without locks
      lock.close()
      continue
    with lock:
      yield
    return
  raise OSError(f"cannot take a lock to prepare {builder.data_dir}: neither "
                f"{root} nor {tempfile.gettempdir()} is writable; set TMPDIR "
                "to a writable folder")


def _prepare(builder: Any, name: str, *, download: bool,
             file_format: str | None) -> None:
  # Builders of local files (Debian's Fashion-MNIST) and tfds.testing's
  # mock_data (whose download_and_prepare is a no-op) need no network.
  local = getattr(builder, "READS_LOCAL_FILES", False) or mocked(builder)
  searched = str(builder.data_dir)
  way_out = (f"prepare it where there is network (`tfds build {name} "
             "--data_dir=DIR`), copy DIR here and pass --config.data_dir=DIR")
  if not local:
    if not download:
      raise ValueError(f"data set {name!r} is not prepared in {searched} and "
                       f"config.download is False: {way_out}")
    offline = network_available()
    if offline is not None:
      raise ValueError(f"data set {name!r} is not prepared in {searched} and "
                       f"cannot be downloaded ({offline}): {way_out}")
  kwargs = {"file_format": file_format} if file_format else {}
  if local:  # its own errors say how to get the files
    builder.download_and_prepare(**kwargs)
    return
  try:
    builder.download_and_prepare(**kwargs)
  except (OSError, AssertionError) as e:  # download / manual-dir failures
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise ValueError(f"data set {name!r} could not be prepared in {searched} "
                     f"({type(e).__name__}: {first}): {way_out}") from None
