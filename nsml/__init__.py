"""The NSML client: the SDK used by training code, the ``nsml`` CLI and the notebook magics.

In training code::

    import nsml
    nsml.bind(save=save_fn, load=load_fn, infer=infer_fn)
    for step in ...:
        nsml.report(step=step, loss=loss)
    nsml.save(epoch)

``nsml.sessions`` holds the session functions (run, ps, logs, stop, fork, ...) that the CLI
and the magics share; :class:`Client` talks to the API.
"""

from .client import Client, NSMLError
from .config import ClientConfig, ConfigError, resolve
from .sdk import (
    DATASET_NAME,
    DATASET_PATH,
    DATASET_PATHS,
    IS_EVALUATION,
    IS_ON_NSML,
    SESSION_NAME,
    CheckpointError,
    bind,
    bound,
    flush,
    load,
    loaded_checkpoint,
    report,
    save,
)

__all__ = [
    "DATASET_NAME",
    "DATASET_PATH",
    "DATASET_PATHS",
    "IS_EVALUATION",
    "IS_ON_NSML",
    "SESSION_NAME",
    "CheckpointError",
    "Client",
    "ClientConfig",
    "ConfigError",
    "NSMLError",
    "bind",
    "bound",
    "flush",
    "load",
    "loaded_checkpoint",
    "report",
    "resolve",
    "save",
]
__version__ = "0.1.0"
