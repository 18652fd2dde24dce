"""Protocol classes generated from the engine's method descriptions (their forms: ``forms.py``).

``make_protocols()`` returns one ``ProtCryohetBase`` subclass per method, named
``CryohetProt<Method>`` and defined in ``cryohet_plugin.protocols``, so that pyworkflow finds it
there by name in any process (the GUI, the protocol runner, scripts).
"""
from __future__ import annotations

import re

from pwem.protocols import EMProtocol

from ..constants import HOST_FILLED
from .protocol_base import ProtCryohetBase

MODULE = "cryohet_plugin.protocols"


def class_name(method_name: str) -> str:
    return "CryohetProt" + "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]", method_name) if w)


def _reserved() -> set[str]:
    return set(dir(ProtCryohetBase)) | set(vars(EMProtocol()))


def attr_names(method) -> dict[str, str]:
    """Scipion attribute for each parameter in the form (prefixed when it clashes with Protocol's)."""
    reserved = _reserved()
    return {p.name: ("cryohet_" + p.name if p.name in reserved else p.name)
            for p in method.all_params() if p.name not in HOST_FILLED}


def make_protocol_class(method) -> type[ProtCryohetBase]:
    """A ProtCryohetBase subclass for ``method`` (named ``CryohetProt<Method>``)."""
    name = class_name(method.name)
    doc = (f"{method.title}.\n\n{method.help}\n\n"
           f"(cryohet method ``{method.name}``; outputs: {', '.join(method.outputs)})")
    return type(name, (ProtCryohetBase,), {
        "__module__": MODULE,
        "__doc__": doc,
        "__qualname__": name,
        "_label": f"cryohet {method.name}",
        "_methodName": method.name,
        "_paramAttrs": attr_names(method),
    })


def make_protocols() -> dict[str, type[ProtCryohetBase]]:
    """One protocol class per engine method (descriptions from the cache, see ``descriptions``)."""
    from .. import Plugin
    from ..descriptions import load_descriptions

    classes = {}
    for method in load_descriptions(Plugin).values():
        cls = make_protocol_class(method)
        classes[cls.__name__] = cls
    return classes
