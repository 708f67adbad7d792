"""
Settings as nanoGPT's configurator.py reads them: config files (Python files that assign settings),
then --key=value arguments, the last word winning; each value checked against the type of the
dataclass field it sets; --help written from the comment beside each field.

    settings = read_settings(["config/cpu_small.py", "--max_iters=100"])
    train_args, model_args = split_settings(settings, TrainConfig, PrismConfig)
"""

import inspect
import re
import types
from dataclasses import fields


class SettingsError(Exception):
    """A bad config file, key or value: train.py prints it as one line `error: ...`, exit status 2."""


def read_config_file(path):
    """The settings a config file assigns: its top-level names, except _private names, modules,
    functions and classes."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        raise SettingsError(f"no config file {path}") from None
    namespace = {}
    exec(compile(source, path, "exec"), namespace)  # noqa: S102 — config files are Python by design
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def read_settings(argv):
    """Config files, then --key=value arguments -> {key: (value, its config file or None)}."""
    settings = {}
    for path in (a for a in argv if not a.startswith("--")):
        settings.update({k: (v, path) for k, v in read_config_file(path).items()})
    for arg in (a for a in argv if a.startswith("--")):
        key, eq, value = arg[2:].partition("=")
        if not (key and eq):
            raise SettingsError(f"expected --key=value, got {arg!r}")
        settings[key] = (value, None)
    return settings


def typed(key, value, source, default):
    """A command-line string (source None) parsed, or a config file's value checked, as the type of
    the field's default; a default None means auto (true, false or auto)."""
    kind = bool if default is None else type(default)
    if source is not None:  # a config file's value: checked, not parsed; an int is a fine float
        if (value is None and default is None) or type(value) is kind or (kind is float and type(value) is int):
            return value if value is None else kind(value)
        raise SettingsError(f"{key} = {value!r} in {source} should be of type {kind.__name__}")
    words = {"true": True, "false": False, **({"auto": None} if default is None else {})}
    try:
        return words[value.lower()] if kind is bool else kind(value)
    except (KeyError, ValueError):
        expected = " or ".join(words) if kind is bool else kind.__name__
        raise SettingsError(f"--{key} expects {expected}, got {value!r}") from None


def split_settings(settings, *classes, refused=None, hint=""):
    """read_settings' {key: (value, source)} -> one dict of typed values per dataclass in `classes`,
    each key to the first class that has it; `refused` maps keys no one may set to the reason, and
    `hint` ends the message for a key no class has."""
    refused, split = refused or {}, [{} for _ in classes]
    for key, (value, source) in settings.items():
        owner = next((i for i, cls in enumerate(classes) if key in cls.__dataclass_fields__), None)
        where = source or "the command line"
        if key in refused:
            raise SettingsError(f"{key} (from {where}) cannot be set: {refused[key]}")
        if owner is None:
            raise SettingsError(f"unknown key {key!r} (from {where}): not a field of "
                                f"{' or '.join(c.__name__ for c in classes)}{hint}")
        split[owner][key] = typed(key, value, source, classes[owner].__dataclass_fields__[key].default)
    return split


def field_help(cls):
    """{field name: the comment on its line}: each setting is described once, where it is defined."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2].strip() for m in (re.match(r"\s+(\w+)\s*:[^#]*#(.*)", x) for x in lines) if m}


def describe(cls, values, where, skip=()):
    """--help's lines for cls: --name=DEFAULT, its comment, and [where: value] where `values` differ."""
    text, lines = field_help(cls), []
    for f in (f for f in fields(cls) if f.name not in skip):
        shown = "auto" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        lines.append(f"  {f'--{f.name}={shown}':<28} {text.get(f.name, '')}" + (
            f"  [{where}: {values[f.name]}]" if values.get(f.name, f.default) != f.default else ""))
    return lines
