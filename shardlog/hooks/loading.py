"""Loading a shard's hooks: ``module:attr`` names and built-ins -> callables.

An import failure, a missing attribute or a factory that raises is a ConfigError naming
the key (``shards[2].hooks[0]``), at ``shardlog check`` and at start, never later.
``shardlog check`` imports the modules but never calls a factory of yours (it checks that the
factory is callable and takes the args); ``shardlog record`` calls it at start.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any

from shardlog.config.load import hook_key, hook_specs
from shardlog.config.schema import ConfigError, HookSpec, Shard, ShardMap
from shardlog.hooks import builtin as builtin_hooks
from shardlog.hooks.message import LoadedHook, _error_text


def resolve(name: str) -> Any:
    """``package.module:attr.attr`` -> the object. Raises ImportError/AttributeError."""
    module_name, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_hook(spec: HookSpec, key: str, call: bool = True) -> LoadedHook:
    """One hook entry -> the callable, or ConfigError naming ``key``. ``call=False`` (check):
    a factory (``use`` with ``args``) is imported and its signature checked, never called; the
    LoadedHook then holds the factory."""
    if ":" not in spec.use:  # a built-in: always a factory, its args validated by a Struct
        if spec.use not in builtin_hooks.BUILTINS:
            raise ConfigError(f"{key}: no built-in hook named {spec.use!r} (built-ins: "
                              f"{', '.join(sorted(builtin_hooks.BUILTINS))}; write module:function "
                              "for your own)")
        return LoadedHook(spec.use, builtin_hooks.make(spec.use, spec.args, f"{key}.args"))
    try:
        obj = resolve(spec.use)
    except Exception as exc:  # whatever the module raised on import
        raise ConfigError(f"{key}: cannot import {spec.use!r}: {_error_text(exc)} "
                          f"(sys.path starts {sys.path[:3]})") from None
    if spec.args and not call:
        _check_signature(obj, spec, key)
    elif spec.args:
        try:
            obj = obj(**spec.args)
        except Exception as exc:
            raise ConfigError(f"{key}.args: {spec.use}(**args) raised {_error_text(exc)}") from None
    if not callable(obj):
        raise ConfigError(f"{key}: {spec.use!r} is a {type(obj).__name__}, not a callable")
    return LoadedHook(spec.use, obj)


def _check_signature(factory: Any, spec: HookSpec, key: str) -> None:
    """Would ``factory(**args)`` bind? Without calling it (user code must not run at check)."""
    if not callable(factory):
        raise ConfigError(f"{key}: {spec.use!r} is a {type(factory).__name__}, not a callable factory")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some C functions): the call at start decides
        return
    try:
        sig.bind(**spec.args)
    except TypeError as exc:
        raise ConfigError(f"{key}.args: {spec.use}(**args) would fail: {exc}") from None


def load_hooks(smap: ShardMap, shard: Shard, call: bool = True) -> list[LoadedHook]:
    """Import a shard's hooks (its hooks_path first on sys.path). Raises ConfigError."""
    for path in reversed(shard.hooks_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    return [load_hook(spec, hook_key(smap, shard, j), call) for j, spec in enumerate(hook_specs(shard))]


def check_hooks(smap: ShardMap) -> int:
    """Import every shard's hooks (``shardlog check``) without calling a factory of yours; the
    number of hooks. Raises ConfigError."""
    return sum(len(load_hooks(smap, s, call=False)) for s in smap.shards)
