"""Exception types a user can act on; each message says what was expected and what came."""


class AITuneError(Exception):
    """Base of the errors aitune_core raises on purpose."""


class UnsupportedDeviceError(AITuneError, ValueError):
    """The device does not exist here, or cannot run the chosen backend or quantization."""


class CheckpointError(AITuneError):
    """A checkpoint or manifest is missing, tampered with, or from an incompatible version."""


class BadRequestError(AITuneError, ValueError):
    """A request body that does not match the model's recorded inputs (HTTP 400)."""


class ArchiveError(AITuneError):
    """``aitune-archive`` could not build or package the model; nothing was written."""


class ConfigError(AITuneError, ValueError):
    """A model-config.yaml setting this project reads has a value it cannot use."""
