"""ferrogate: an API gateway with a Rust data plane (``ferrogate._core``) and this Python
control plane (config loading and validation, process supervision, the command line), plus
the plugin SDK: ``Plugin``, ``Request``, ``Response``, ``Headers``, ``LogInfo``.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ferrogate.config import (
        Config,
        ConfigError,
        LoadedConfig,
        Problem,
        config_schema,
        load_config,
        normalize,
        normalized_json,
    )
    from ferrogate.hooks import Attempt, Headers, LogInfo, Params, Request, Response
    from ferrogate.plugin import Plugin

__version__: str

__all__ = [
    "Attempt",
    "Config",
    "ConfigError",
    "Headers",
    "LoadedConfig",
    "LogInfo",
    "Params",
    "Plugin",
    "Problem",
    "Request",
    "Response",
    "__version__",
    "config_schema",
    "load_config",
    "normalize",
    "normalized_json",
]

# Exports are loaded on first use: every worker process imports this package, and a worker
# replacing a dead one should not pay for YAML, msgspec and importlib.metadata.
_LAZY = {
    **{name: "ferrogate.config" for name in __all__ if name != "__version__"},
    **{
        name: "ferrogate.hooks"
        for name in ("Attempt", "Headers", "LogInfo", "Params", "Request", "Response")
    },
    "Plugin": "ferrogate.plugin",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ferrogate")
    except PackageNotFoundError:
        from ferrogate import _core

        return _core.__version__


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'ferrogate' has no attribute {name!r}")
    globals()[name] = value
    return value
