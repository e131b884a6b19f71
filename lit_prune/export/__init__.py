"""Export of a pruned model: :func:`save_compressed` / :func:`load_compressed` (bitmask + kept values).

Plain torch and safetensors: no Lightning or Hydra.
"""

from lit_prune.export.compressed import CompressedFileError, load_compressed, save_compressed

__all__ = ["CompressedFileError", "load_compressed", "save_compressed"]
