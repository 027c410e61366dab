"""Console entry points. Logging is set up before torch and torchao are imported, so their
import-time notices about CUDA-only kernels (harmless on a CPU) stay out of the terminal."""

import logging
import sys


def quiet_import_noise() -> None:
    """Hide torchao's and torch's import-time warnings; errors still show."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def archive_main() -> int:
    """``aitune-archive``: see aitune_core.archive."""
    quiet_import_noise()
    from aitune_core.archive import main

    return main()


if __name__ == "__main__":
    sys.exit(archive_main())
