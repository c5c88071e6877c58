"""An in-memory file system answering for gs:// (what gcsfs does over the network), through etils.epath."""

import contextlib
import os

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as _fsspec_registry


class MemoryGCS(MemoryFileSystem):
  """gs:// and gcs:// on a dict (`store`) in this process."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@contextlib.contextmanager
def memory_gcs():
  """Routes gs:// through `MemoryGCS` for the block. epath sends gs:// to tf.io.gfile when
  TensorFlow is installed (the tfds extra) unless EPATH_USE_TF is false: set for the block."""
  previous = fsspec.registry.get("gcs"), fsspec.registry.get("gs")
  previous_env = os.environ.get("EPATH_USE_TF")
  os.environ["EPATH_USE_TF"] = "false"
  epath_gpath._is_tf_installed.cache_clear()  # cached on first use
  for name in ("gcs", "gs"):
    fsspec.register_implementation(name, MemoryGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  MemoryGCS.store.clear()
  MemoryGCS.pseudo_dirs[:] = [""]
  try:
    yield MemoryGCS
  finally:
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    for name, cls in zip(("gcs", "gs"), previous):
      if cls is not None:
        fsspec.register_implementation(name, cls, clobber=True)
      else:
        _fsspec_registry.pop(name, None)  # gcsfs (if installed) loads lazily again
    if previous_env is None:
      os.environ.pop("EPATH_USE_TF", None)
    else:
      os.environ["EPATH_USE_TF"] = previous_env
    epath_gpath._is_tf_installed.cache_clear()
