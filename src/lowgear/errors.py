"""The project's exceptions.

Every error a user can cause (a bad file, an impossible setting, a prompt that does not fit, a
device that is missing or full) is raised as a `LowgearError` subclass whose message says what is
wrong and what to do. The CLI prints these without a traceback; anything else is a bug.
"""


class LowgearError(Exception):
    """Base of every user-facing error."""


class ModelFormatError(LowgearError):
    """The model file or folder is missing, truncated, corrupt or malformed."""


class UnsupportedError(LowgearError):
    """The model uses something lowgear does not implement (architecture, quant type, ...)."""


class ConfigError(LowgearError):
    """A setting is impossible or contradictory."""


class SamplingError(ConfigError):
    """A sampling parameter is out of range."""


class ContextLengthError(LowgearError):
    """A prompt (plus the tokens asked for) does not fit the context or the cache."""


class DeviceError(LowgearError):
    """A named device does not exist or cannot be used by this torch build."""


class OutOfMemoryError(LowgearError):
    """The plan or the run needs more memory than the devices have."""


class BackendUnavailableError(LowgearError):
    """A forced attention backend cannot run on this device."""


class MissingDependencyError(LowgearError):
    """An optional package that a feature needs is not installed."""


def install_hint(extra: str) -> str:
    """The command that installs one of lowgear's optional extras (pyproject.toml)."""
    return f"pip install 'lowgear[{extra}]'"


def require(module: str, extra: str, feature: str):
    """Import an optional package for `feature`, or raise one line naming the extra that installs it.

    Every optional import a user can reach goes through here, so a missing package is always
    `<feature> needs <module>, which is not installed: pip install 'lowgear[<extra>]'`, never a traceback.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or module).split(".")[0]
        why = "which is not installed" if isinstance(exc, ModuleNotFoundError) else f"which fails to import ({exc})"
        raise MissingDependencyError(f"{feature} needs the package {missing!r}, {why}: {install_hint(extra)}") from None
