"""cryohet protocols: one class per engine method, generated from the method descriptions.

The classes (``CryohetProtReconstruct``, ``CryohetProtSimulate``, ...) are module attributes here,
which is where pyworkflow looks for a plugin's protocols, in the GUI and in the process that runs
a protocol alike.
"""
from .generated import class_name, make_protocols
from .protocol_base import EngineError, ProtCryohetBase

globals().update(make_protocols())

__all__ = ["ProtCryohetBase", "EngineError", "class_name", "make_protocols", *make_protocols()]
