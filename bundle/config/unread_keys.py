"""Unread configuration keys are errors: a top-level key that no component references is a setting with no effect.

A method's arguments live inside its ``method`` component (``--method#<arg> value``), so an override of an argument
the method does not have fails in the method's constructor. What remains is a *top-level* key that nothing reads,
such as a stale ``--efs_percentile 80`` on Mean Teacher, or a key of an earlier layout (``--labeled_batch_size``):
:func:`check_config_keys` stops such a run before anything is built (docs/architecture.md, "Configuration").
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Dict, Iterator, List

from monai.bundle import ConfigParser
from monai.utils import optional_import

from bundle.config.errors import BundleError

#: ids a workflow runs or MONAI reads by name (bundle properties), although no other key references them.
ENTRY_POINTS = frozenset(
    {
        "imports",
        "initialize",
        "run",
        "training",
        "score_masks",
        "finalize",
        "bundle_root",
        "device",
        "dataset_dir",
        "network_def",
    }
)
#: keys of a benchmark protocol (``configs/benchmark/*.json``) that ``benchmarking/runs.py`` reads, not a component:
#: ``method_args``, the protocol's method arguments, passed as ``--method#<arg>`` to the methods that take them.
PROTOCOL_KEYS = frozenset({"method_args"})
#: ``@id`` and ``%id`` references; the first id segment (before ``#`` or ``::``) is the top-level key.
REFERENCE = re.compile(r"[@%]([A-Za-z_]\w*)")


def strings(node: Any) -> Iterator[str]:
    """Every string inside ``node`` (nested dicts and lists), keys excluded."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def unread_keys(config: Dict[str, Any]) -> List[str]:
    """Top-level keys of ``config`` that no string of ``config`` references (``@key...``, ``$...@key...``,
    ``%key``), other than :data:`ENTRY_POINTS`, :data:`PROTOCOL_KEYS` and ``_``-prefixed keys (``_desc_``,
    ``_meta_``)."""
    referenced = {match for text in strings(config) for match in REFERENCE.findall(text)} | ENTRY_POINTS | PROTOCOL_KEYS
    return [key for key in config if key not in referenced and not str(key).startswith("_")]


def method_parameters(target: str) -> Dict[str, inspect.Parameter]:
    """The constructor parameters of the method class ``target`` (dotted path), including those a subclass passes
    on to its bases with ``**kwargs`` (e.g. UA-MT -> Mean Teacher -> the EMA base); empty when it cannot be
    located."""
    module_name, _, name = str(target).rpartition(".")
    cls, found = optional_import(module_name, name=name) if module_name else (None, False)
    parameters: Dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__ if found else ():
        if "__init__" not in vars(klass) or klass.__module__.startswith("torch"):
            continue
        for param in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if param.name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                parameters.setdefault(param.name, param)
    return parameters


def method_arguments(config: Dict[str, Any]) -> List[str]:
    """The constructor arguments of ``config["method"]["_target_"]`` (:func:`method_parameters`)."""
    method = config.get("method")
    return list(method_parameters(method.get("_target_", ""))) if isinstance(method, dict) else []


def check_config_keys(config: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every argument of ``config["method"]`` that its class does not take, or every
    unread top-level key of ``config`` (:func:`unread_keys`), with the ``--method#<arg>`` spelling when the key is an
    argument of the configured method."""
    arguments = method_arguments(config)
    method = config.get("method")
    foreign = [k for k in method if not k.startswith("_") and k not in arguments] if isinstance(method, dict) else []
    if arguments and foreign:
        raise BundleError(f"{method['_target_']} takes no argument(s) {foreign}; it takes {arguments}.")
    unread = unread_keys(config)
    if not unread:
        return
    hints = [f"--method#{key}" if key in arguments else "no component reads it" for key in unread]
    details = "; ".join(f"{key} ({hint})" for key, hint in zip(unread, hints))
    raise BundleError(f"configuration keys with no effect: {details}. Method arguments are set as --method#<arg>.")


def active_parser() -> ConfigParser:
    """The ``ConfigParser`` of the configuration being run, for a component of that configuration.

    MONAI gives a config component no handle on its parser, so the parser is found as the ``self`` of a calling
    frame (``ConfigParser.get_parsed_content``). The alternatives MONAI 1.6 offers do not serve: ``"%"`` (the raw
    config) is parsed again into live components, ``"@"`` (the root) is a circular reference from ``initialize``, and
    a ``ConfigWorkflow`` subclass would need ``--workflow_name`` on every user's command line."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    raise RuntimeError("this check runs as a component of a monai.bundle config (an 'initialize' entry).")


def check_active_config() -> None:
    """:func:`check_config_keys` on the configuration being run (:func:`active_parser`): an ``initialize`` entry of
    ``train.json``."""
    check_config_keys(active_parser().get())
