"""Networks that describe themselves: a trained model carries the MONAI config that rebuilds its inference network.

A :class:`DescribedNetwork` remembers the arguments it was constructed with; :func:`network_config` turns a network
(and the described networks it wraps) into a config dict (``{"_target_": "<module>.<class>", <argument>: ...}``),
which training writes into ``models/model_metadata.json`` (key ``network_def``) and inference rebuilds with MONAI's
``ConfigParser`` (:func:`build_network`). So a new method's inference network needs no inference overlay: whatever
module its :meth:`~bundle.methods.base.SSLMethod.inference_network` returns is rebuilt from the model's settings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict

from monai.bundle import ConfigParser
from torch import nn

from bundle.config.errors import BundleError

#: JSON value types a constructor argument may have (lists and dicts of them included).
_JSON_SCALARS = (str, int, float, bool, type(None))


class DescribedNetwork(nn.Module):
    """An ``nn.Module`` whose subclasses record their constructor arguments in :attr:`constructor_args`.

    The outermost ``__init__`` of an instance records (a subclass calling ``super().__init__(**kwargs)`` does not
    overwrite it); defaults are filled in and ``**kwargs`` are flattened, so the record is the full call that
    rebuilds the instance. Any network can be made one, e.g. ``class DescribedUNet(DescribedNetwork, UNet): pass``
    for MONAI's ``UNet``. Written by hand because ``torch.nn`` and MONAI keep no such record.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__  # its own or the inherited one: ``class DescribedUNet(DescribedNetwork, UNet)`` works
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "constructor_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                recorded: Dict[str, Any] = {}
                for name, value in list(bound.arguments.items())[1:]:
                    kind = signature.parameters[name].kind
                    if kind is inspect.Parameter.VAR_POSITIONAL:
                        raise TypeError(f"{cls.__qualname__}: positional *{name} cannot be described; use keywords.")
                    recorded.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
                object.__setattr__(self, "constructor_args", recorded)
            init(self, *args, **kw)

        cls.__init__ = recording_init


def network_config(network: nn.Module) -> Dict[str, Any]:
    """The MONAI config that rebuilds ``network`` (weights aside): ``_target_`` is its class, each argument is a JSON
    value or the config of a wrapped :class:`DescribedNetwork`. Raises ``TypeError`` for a network that is not
    described or an argument that JSON cannot hold."""
    if not isinstance(network, DescribedNetwork):
        raise TypeError(f"{type(network).__qualname__} is not a DescribedNetwork: its config cannot be recorded.")
    config: Dict[str, Any] = {"_target_": f"{type(network).__module__}.{type(network).__qualname__}"}
    for name, value in network.constructor_args.items():
        config[name] = network_config(value) if isinstance(value, nn.Module) else _json_value(value, name, network)
    return config


def _json_value(value: Any, name: str, network: nn.Module) -> Any:
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, name, network) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, name, network) for k, v in value.items()}
    raise TypeError(f"{type(network).__qualname__}: argument {name}={value!r} cannot be written as JSON.")


def build_network(config: Dict[str, Any], source: str = "network_def") -> nn.Module:
    """Instantiate a config of :func:`network_config` with MONAI's ``ConfigParser``; ``source`` names where the
    config came from in the error raised for a config that does not build."""
    try:
        return ConfigParser({"network": config}).get_parsed_content("network")
    except Exception as error:  # a stale class name or argument: name the file, not a parser stack
        raise BundleError("Cannot build the model's network:", [f"{source}: {type(error).__name__}: {error}"])
