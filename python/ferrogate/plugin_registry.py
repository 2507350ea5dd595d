"""Finding plugins and describing them: the first-party ones, the ``ferrogate.plugins``
entry-point group, and the files of a config's ``plugins_dir``.

Every discovery imports plugin code afresh, so a reload picks up changed code: files of
``plugins_dir`` are executed as new module objects, and an entry point's package is
re-imported. Objects made from the previous code stay alive as long as requests in flight
still use them.
"""

import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from ferrogate.plugin import Plugin, declared_hooks

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "PluginSpec", "Registry", "discover", "spec_of"]

ENTRY_POINT_GROUP = "ferrogate.plugins"

# The first-party plugins, as ``module:Class``.
BUILTIN = {
    "request-transformer": "ferrogate.plugins.request_transformer:RequestTransformer",
    "response-transformer": "ferrogate.plugins.response_transformer:ResponseTransformer",
    "cors": "ferrogate.plugins.cors:Cors",
    "request-termination": "ferrogate.plugins.request_termination:RequestTermination",
    "key-auth": "ferrogate.plugins.key_auth:KeyAuth",
    "basic-auth": "ferrogate.plugins.basic_auth:BasicAuth",
    "acl": "ferrogate.plugins.acl:Acl",
    "oauth2-introspection": "ferrogate.plugins.oauth2_introspection:OAuth2Introspection",
    "hmac-auth": "ferrogate.plugins.hmac_auth:HmacAuth",
    "jwt": "ferrogate.plugins.jwt_auth:JwtAuth",
    "json-threat-protection": "ferrogate.plugins.json_threat_protection:JsonThreatProtection",
    "policy": "ferrogate.plugins.policy:Policy",
    "request-validation": "ferrogate.plugins.request_validation:RequestValidation",
    "graphql": "ferrogate.plugins.graphql:GraphQL",
    "soap": "ferrogate.plugins.soap:Soap",
    "grpc-transcode": "ferrogate.plugins.grpc_transcode:GrpcTranscode",
    "ai-gateway": "ferrogate.ai.plugin:AiGateway",
}

BodyMode = Literal["none", "buffered", "streamed"]


@dataclass(frozen=True)
class PluginSpec:
    """What the gateway needs to know about one plugin class."""

    name: str
    cls: type[Plugin]
    source: str
    """Where it came from: ``builtin``, ``entry point <dist>``, or the file it was defined in."""
    hooks: dict[str, bool]
    """Declared hooks, each mapped to whether it is async."""
    request_body: bool
    response_body: BodyMode
    max_body_size: int
    priority: int

    @property
    def config_type(self) -> type[Any]:
        return self.cls.Config

    @property
    def doc(self) -> str:
        return (self.cls.__doc__ or "").strip().split("\n\n")[0]


@dataclass
class Registry:
    plugins: dict[str, PluginSpec] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Files of ``plugins_dir`` that could not be loaded, each a sentence with the reason."""
    warnings: list[str] = field(default_factory=list)
    """Installed plugins (entry points) that could not be loaded: they matter only to the
    configs that use them, which then name these reasons."""


def spec_of(cls: type[Plugin], source: str) -> PluginSpec:
    """Describe ``cls``; raises ValueError when it breaks the SDK's rules."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} has no `name` (a non-empty str class attribute)")
    hooks = declared_hooks(cls)
    if not hooks:
        raise ValueError(f"plugin '{name}' defines no hook (on_request, on_response, ...)")
    for body_hook in ("on_response_body", "on_response_chunk"):
        if hooks.get(body_hook):
            raise ValueError(f"plugin '{name}': {body_hook} must be a plain def, not async")
    if cls.request_body not in ("none", "buffered"):
        raise ValueError(f"plugin '{name}': request_body must be 'none' or 'buffered'")
    mode: BodyMode = "none"
    if "on_response_body" in hooks:
        mode = "buffered"
    elif "on_response_chunk" in hooks:
        mode = "streamed"
    return PluginSpec(
        name=name,
        cls=cls,
        source=source,
        hooks=hooks,
        request_body=cls.request_body == "buffered",
        response_body=mode,
        max_body_size=int(cls.max_body_size),
        priority=int(cls.priority),
    )


def _load_ref(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _fresh_import(module_name: str) -> None:
    """Drop ``module_name``'s package from the import cache, so the next import reads the
    code on disk again (ferrogate's own modules are never dropped)."""
    top = module_name.split(".")[0]
    if top == "ferrogate":
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def _reason(exc: BaseException) -> str:
    """The exception and where in the plugin's code it happened, in one line."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _add(reg: Registry, spec: PluginSpec) -> None:
    known = reg.plugins.get(spec.name)
    if known is not None and known.cls is not spec.cls:
        reg.problems.append(
            f"plugin name '{spec.name}' is taken twice: by {known.source} and by {spec.source}"
        )
        return
    reg.plugins[spec.name] = spec


def _plugin_classes(module: Any) -> list[type[Plugin]]:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Plugin)
        and obj is not Plugin
        and obj.__module__ == module.__name__
        and "name" in vars(obj)
    ]


_generation = 0


def _not_a_plugin_file(name: str) -> bool:
    """Tests and helper scripts may live beside plugin files; they are never executed."""
    return (
        name.startswith("test_")
        or name.endswith("_test.py")
        or name in ("conftest.py", "setup.py", "noxfile.py")
    )


def _load_dir(reg: Registry, directory: Path) -> None:
    global _generation
    if not directory.is_dir():
        reg.problems.append(f"plugins_dir {directory} is not a directory")
        return
    _generation += 1
    for file in sorted(directory.glob("*.py")):
        if file.name.startswith("_") or _not_a_plugin_file(file.name):
            continue
        # A new module name each time: a reload must not reuse the cached module.
        module_name = f"ferrogate_local_{_generation}.{file.stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(module_name, None)
            reg.problems.append(f"cannot load plugin file {file}: {_reason(e)}")
            continue
        for cls in _plugin_classes(module):
            try:
                _add(reg, spec_of(cls, str(file)))
            except ValueError as e:
                reg.problems.append(f"{file}: {e}")


def discover(plugins_dir: str | Path | None = None) -> Registry:
    """Every plugin available: first-party, entry points, then ``plugins_dir`` files."""
    reg = Registry()
    for name, ref in BUILTIN.items():
        try:
            spec = spec_of(_load_ref(ref), "builtin")
        except Exception as e:
            reg.warnings.append(f"cannot load the built-in plugin {name}: {_reason(e)}")
            continue
        reg.plugins[name] = spec
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        source = f"entry point {ep.name} ({dist})"
        try:
            _fresh_import(ep.module)
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise TypeError(f"{ep.value} is not a ferrogate.Plugin subclass")
            _add(reg, spec_of(cls, source))
        except BaseException as e:
            reg.warnings.append(f"cannot load plugin {source}: {_reason(e)}")
    if plugins_dir is not None:
        _load_dir(reg, Path(plugins_dir))
    return reg
