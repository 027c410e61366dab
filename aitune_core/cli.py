"""Console entry points, and the quieting of torch/torchao import notices they share with the handler."""

import logging
import os
import sys
import warnings

# Harmless on a CPU or a GPU without those kernels: torchao's "Failed to load _C_*.so" and
# torch's pytree deprecation notices, printed once per process at import.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_import_notices() -> None:
    """Raise the level of the loggers that print import-time notices; errors still show.

    Must run before torchao is imported, so ``aitune_core`` imports it lazily.
    """
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch.compile of torchao's tensors: a note to torchao's developers, once per tensor class.
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")


def archive_main() -> int:
    """``aitune-archive``: see aitune_core.archive."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    silence_import_notices()
    # A Hugging Face folder is read from disk only, without transformers' progress bars in the summary.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from aitune_core.archive import main

    return main()


def kserve_main() -> int:
    """``aitune-kserve``: see aitune_core.kserve."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from aitune_core.kserve import main

    return main()


if __name__ == "__main__":
    sys.exit(archive_main())
