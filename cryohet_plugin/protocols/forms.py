"""The Scipion form of a cryohet protocol, built from its method's description.

Parameter mapping: int -> IntParam, float -> FloatParam, str with choices -> EnumParam,
str -> StringParam, bool -> BooleanParam, path with input role particles/volume/mask ->
PointerParam(SetOfParticles / Volume / VolumeMask), other paths -> FileParam; ``min``/``max``
become validators, ``expert`` becomes LEVEL_ADVANCED. ``device`` and ``threads`` come from the
protocol's GPU and thread settings.

Below ``protocol_base`` (which calls ``define_form``) and ``generated``; imports neither.
"""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, LEVEL_ADVANCED, USE_GPU

from ..constants import POINTER_CLASSES

#: Readable words for the unit suffixes and abbreviations of parameter names.
_UNITS = {"A": "Å", "A2": "Å²", "deg": "deg", "px": "px", "kV": "kV", "mm": "mm", "invA": "1/Å", "mb": "MiB",
          "pct": "%"}
_WORDS = {"apix": "pixel size (Å/px)", "snr": "SNR", "n": "number of", "fsc": "FSC", "cs": "Cs",
          "ctf": "CTF", "pca": "PCA", "pc": "PC", "umap": "UMAP", "zdim": "latent dimension", "lr": "learning rate"}
#: Units of names without a unit suffix (a box is in pixels: ``box``, ``crop_box``).
_IMPLIED_UNITS = {"box": "px"}


def param_label(name: str) -> str:
    """A form label from a parameter name: ``lowpass_A`` -> ``Lowpass (Å)``, ``crop_box`` -> ``Crop box (px)``."""
    parts = name.split("_")
    unit = _UNITS.get(parts[-1]) if len(parts) > 1 else None
    if unit:
        parts = parts[:-1]
    else:
        unit = _IMPLIED_UNITS.get(parts[-1])
    words = " ".join(_WORDS.get(w.lower(), w) for w in parts)
    words = words[:1].upper() + words[1:]
    return f"{words} ({unit})" if unit else words


def _help(p) -> str:
    text = p.help
    if p.choices:
        text += f"\nChoices: {', '.join(map(str, p.choices))}."
    if p.min is not None or p.max is not None:
        lo = "" if p.min is None else f"{p.min:g} <= "
        hi = "" if p.max is None else f" <= {p.max:g}"
        text += f"\nRange: {lo}value{hi}."
    return text + f"\ncryohet param: *{p.flag}*"


class Bounds(params.Conditional):
    """``lo <= value <= hi`` (either bound may be None); an empty value passes when the parameter is optional
    (pyworkflow's own GE, LE and Range refuse it)."""

    def __init__(self, lo: float | None, hi: float | None, error: str, allows_null: bool):
        super().__init__(error, allowsNull=allows_null)
        self._condition = lambda value: value is not None and (lo is None or value >= lo) and (hi is None or
                                                                                               value <= hi)


def _validators(p) -> list:
    if p.min is None and p.max is None:
        return []
    if p.max is None:
        error = f"{p.name} must be >= {p.min:g}"
    elif p.min is None:
        error = f"{p.name} must be <= {p.max:g}"
    else:
        error = f"{p.name} must be in [{p.min:g}, {p.max:g}]"
    return [Bounds(p.min, p.max, error, allows_null=p.default is None and not p.required)]


def form_param(p) -> tuple[type, dict]:
    """(pyworkflow Param class, keyword arguments) for one method parameter."""
    kw: dict = {"label": param_label(p.name), "help": _help(p)}
    if p.expert:
        kw["expertLevel"] = LEVEL_ADVANCED
    if p.input_role in POINTER_CLASSES:
        kw.update(pointerClass=POINTER_CLASSES[p.input_role], allowsNull=not p.required, important=p.required)
        return params.PointerParam, kw
    if p.type is bool:
        kw["default"] = bool(p.default)
        return params.BooleanParam, kw
    if p.choices is not None:
        choices = [str(c) for c in p.choices]
        kw.update(choices=choices, default=p.choices.index(p.default) if p.default in p.choices else 0,
                  display=params.EnumParam.DISPLAY_HLIST if len(choices) <= 3 else params.EnumParam.DISPLAY_COMBO)
        return params.EnumParam, kw
    if p.default is not None:
        kw["default"] = p.default
    if p.required and p.default is None:
        kw["validators"] = [params.NonEmpty]
    elif p.default is None:
        kw["allowsNull"] = True  # an optional number left empty is not a format error
    if p.type is int:
        kw.setdefault("validators", []).extend(_validators(p))
        return params.IntParam, kw
    if p.type is float:
        kw.setdefault("validators", []).extend(_validators(p))
        return params.FloatParam, kw
    if p.type is str:
        return params.StringParam, kw
    return params.FileParam, kw


def define_form(prot, form) -> None:
    """The form of a generated protocol ``prot`` (a ProtCryohetBase): inputs, parameters, GPU and threads."""
    method = prot.getMethod()
    attrs = prot._paramAttrs
    inputs = [p for p in method.params if p.input_role in POINTER_CLASSES]
    others = [p for p in method.all_params() if p.input_role not in POINTER_CLASSES and p.name in attrs]
    form.addSection(label="Input" if inputs else "Parameters")
    form.addHidden(USE_GPU, params.BooleanParam, default=True, label="Use GPU?",
                   help="Run the engine on a GPU when one is present (else on the CPU).")
    form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                   help="GPUs the engine may use (e.g. 0 or 0,1): becomes CUDA_VISIBLE_DEVICES of its process.")
    for p in inputs:
        cls, kw = form_param(p)
        form.addParam(attrs[p.name], cls, **kw)
    if inputs:
        form.addSection(label="Parameters")
    for p in others:
        cls, kw = form_param(p)
        form.addParam(attrs[p.name], cls, **kw)
    form.addParallelSection(threads=2, mpi=0)
