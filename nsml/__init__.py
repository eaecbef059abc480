"""The NSML client: the SDK used by the ``nsml`` CLI, the notebook magics and training code."""

from .client import Client, NSMLError
from .config import ClientConfig, ConfigError, resolve

__all__ = ["Client", "ClientConfig", "ConfigError", "NSMLError", "resolve"]
__version__ = "0.1.0"
