"""One boolean parser for every boolean setting of every config and script.

``python -m monai.bundle run ... --save_probabilities false`` passes the *string* ``'false'`` (the command line is
parsed by ``fire``: only ``False`` becomes a bool, ``0`` an int), and a string is truthy, so without this module
``false`` meant true. :func:`parse_bool` accepts exactly ``true/false``, ``True/False``, ``1/0`` and ``yes/no`` (as
bools, ints or strings) and rejects anything else with an error naming the key.

* :func:`normalize_config_booleans` parses, in a config, every key that holds a boolean in any of the bundle's
  config files (:func:`config_boolean_paths`) and every argument with a boolean default of a ``bundle.*``
  component (a method's ``normalize_by_value``, ...): ``configs/train.json`` and ``configs/inference.json`` run it
  first in ``initialize`` (:func:`normalize_active_booleans`), before anything reads a setting.
* :func:`boolean_command` wraps a script's function for ``fire``: its boolean arguments go through the same parser.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

from monai.utils import optional_import

#: accepted spellings; anything else is an error.
TRUE_SPELLINGS = ("true", "True", "1", "yes")
FALSE_SPELLINGS = ("false", "False", "0", "no")
SPELLINGS = "true/false, True/False, 1/0 or yes/no"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the bundle root's configs/


class BooleanSettingError(ValueError):
    """A boolean setting with a value that is none of :data:`SPELLINGS`; the message names the key."""


def parse_bool(value: Any, key: str) -> bool:
    """``value`` as a bool: ``True``/``False``, ``1``/``0`` and the strings of :data:`TRUE_SPELLINGS` /
    :data:`FALSE_SPELLINGS`.

    Raises:
        BooleanSettingError: any other value (``'maybe'``, ``2``, ``None``, ``'TRUE'``), naming ``key``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value in TRUE_SPELLINGS + FALSE_SPELLINGS:
        return value in TRUE_SPELLINGS
    raise BooleanSettingError(f"{key}: expected a boolean ({SPELLINGS}), got {value!r}")


# ------------------------------------------------------------------------------------------------- configs
def _boolean_leaves(node: Any, prefix: str = "") -> Iterator[str]:
    """Config paths (``a#b#0``) of every boolean value inside ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}#{key}" if prefix else str(key)
        if isinstance(value, bool):
            yield path
        else:
            yield from _boolean_leaves(value, path)


@functools.lru_cache(maxsize=None)
def config_boolean_paths(config_dir: str = str(CONFIG_DIR)) -> Tuple[str, ...]:
    """Every config path that holds ``true`` or ``false`` in some JSON file under ``config_dir`` (the bundle's
    configs), sorted: the boolean settings a command-line override can reach."""
    paths = set()
    for file in Path(config_dir).rglob("*.json"):
        paths.update(_boolean_leaves(json.loads(file.read_text())))
    return tuple(sorted(paths))


def _lookup(config: Any, path: str) -> Tuple[bool, Any]:
    """``(found, value)`` of ``path`` in ``config``; top-level keys may themselves contain ``#`` (overlays)."""
    if isinstance(config, dict) and path in config:
        return True, config[path]
    if isinstance(config, list) and path.isdigit() and int(path) < len(config):
        return True, config[int(path)]
    head, sep, rest = path.partition("#")
    if not sep:
        return False, None
    if isinstance(config, dict) and head in config:
        return _lookup(config[head], rest)
    if isinstance(config, list) and head.isdigit() and int(head) < len(config):
        return _lookup(config[int(head)], rest)
    return False, None


def _set(config: Any, path: str, value: Any) -> None:
    if isinstance(config, dict) and path in config:
        config[path] = value
        return
    if isinstance(config, list) and path.isdigit():
        config[int(path)] = value
        return
    head, _, rest = path.partition("#")
    _set(config[int(head)] if isinstance(config, list) else config[head], rest, value)


def _component_boolean_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Paths of the arguments, set in ``node``, that a ``bundle.*`` component (``_target_``) takes with a boolean
    default (e.g. ``method#normalize_by_value``), found by walking ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    target = node.get("_target_") if isinstance(node, dict) else None
    defaults = _boolean_defaults(target) if isinstance(target, str) and target.startswith("bundle.") else set()
    for key, value in items:
        path = f"{prefix}#{key}" if prefix else str(key)
        if key in defaults:
            yield path
        yield from _component_boolean_paths(value, path)


@functools.lru_cache(maxsize=None)
def _boolean_defaults(target: str) -> frozenset:
    """Names of the constructor (or function) arguments of ``target`` whose default is a bool, along the MRO."""
    module_name, _, name = target.rpartition(".")
    obj, found = optional_import(module_name, name=name)
    if not found:
        return frozenset()
    names = set()
    functions = [vars(k)["__init__"] for k in obj.__mro__ if "__init__" in vars(k)] if inspect.isclass(obj) else [obj]
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(p.name for p in parameters if isinstance(p.default, bool))
    return frozenset(names)


def normalize_config_booleans(config: Dict[str, Any]) -> Dict[str, bool]:
    """Parse, in place, every boolean setting of ``config`` (a raw config dict, overrides applied): the paths of
    :func:`config_boolean_paths` present in it and the boolean arguments of its ``bundle.*`` components. Values that
    are expressions or references (``$...``, ``@...``, ``%...``) are left to MONAI.

    Returns:
        ``{path: parsed value}`` of every setting that was changed (e.g. ``'false'`` -> ``False``).

    Raises:
        BooleanSettingError: one line per key whose value is not a boolean spelling.
    """
    changed: Dict[str, bool] = {}
    problems: List[str] = []
    paths = dict.fromkeys(list(config_boolean_paths()) + list(_component_boolean_paths(config)))
    for path in paths:
        found, value = _lookup(config, path)
        if not found or isinstance(value, bool) or (isinstance(value, str) and value[:1] in ("$", "@", "%")):
            continue
        try:
            parsed = parse_bool(value, path)
        except BooleanSettingError as err:
            problems.append(str(err))
            continue
        _set(config, path, parsed)
        changed[path] = parsed
    if problems:
        raise BooleanSettingError("\n".join(problems))
    return changed


def normalize_active_booleans() -> Dict[str, bool]:
    """:func:`normalize_config_booleans` on the configuration being run (the first ``initialize`` step of
    ``configs/train.json`` and ``configs/inference.json``); a bad value stops the run with one line per key."""
    from bundle.config.unread_keys import active_parser
    from bundle.data.checks import stop

    parser = active_parser()
    try:
        changed = normalize_config_booleans(parser.get())
    except BooleanSettingError as err:
        stop("Invalid settings (config or command-line overrides):", str(err).splitlines())
    for path, value in changed.items():
        parser[path] = value  # through the parser, so that its resolver is reset and sees the bool
    return changed


# ------------------------------------------------------------------------------------------------- scripts
def boolean_command(function: Callable) -> Callable:
    """Wrap a script's ``function`` for ``fire``: every argument with a boolean default is parsed with
    :func:`parse_bool` (``--allow_unpaired false`` is ``False``); a bad value exits with status 1 and one line
    naming the flag. The signature is kept, so that ``fire`` shows the same help."""
    signature = inspect.signature(function)
    flags = [p.name for p in signature.parameters.values() if isinstance(p.default, bool)]

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        try:
            for name in flags:
                if name in bound.arguments:
                    bound.arguments[name] = parse_bool(bound.arguments[name], f"--{name}")
        except BooleanSettingError as err:
            raise SystemExit(str(err)) from None
        return function(*bound.args, **bound.kwargs)

    return wrapper
