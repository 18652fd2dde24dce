"""One description per method: its parameters (with units) and the kinds of outputs it makes.

The CLI (``cryohet/cli.py``), the Scipion protocol forms (``cryohet_plugin``) and the RELION
External job (``bin/cryohet_external``) are all built from these descriptions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryohet.record import OUTPUT_KINDS  # noqa: F401  (re-exported: the kinds a method's ``outputs`` name)

#: Input roles RELION passes as --in_parts, --in_3dref, --in_mask. The role "run" (an earlier cryohet run
#: folder) is a pointer to a cryohet protocol in Scipion and a plain label/value in RELION.
INPUT_ROLES = {"particles": "in_parts", "volume": "in_3dref", "mask": "in_mask"}


@dataclass(frozen=True)
class Param:
    """A method parameter.

    ``type`` is one of int, float, str, bool, path. ``input_role`` marks a path that a host
    fills from one of its own objects (``particles``, ``volume``, ``mask``, ``run``, ``atomic_model``: a PDB or
    mmCIF file).
    ``help`` states units; ``expert`` hides it from the basic forms.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    required: bool = False
    expert: bool = False
    input_role: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    def check(self, value: Any) -> Any:
        """Convert ``value`` to the parameter's type and check its range; raise ValueError."""
        if value is None:
            if self.required:
                raise ValueError(f"{self.flag} is required")
            return None
        if self.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "y", "n"):
                    raise ValueError(f"{self.flag}: expected yes/no, got {value!r}")
                value = low in ("1", "true", "yes", "y")
            return bool(value)
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.flag}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.flag}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flag}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{self.flag}: {value} is above the maximum {self.max}")
        return value


#: The image-stack folder of methods that read a particles STAR with ``load_particles``.
DATADIR = Param("datadir", Path, None, "Folder to look for the image stacks in when the STAR's image paths are "
                "relative to another folder (default: the STAR's folder, then the current folder).", expert=True)

#: Latent points of the methods that make maps at them (eval-volume, kernel-volumes); read with
#: ``cryohet.analysis.volumes.points_from_params``.
LATENT_POINT_PARAMS = (
    Param("z", str, None, "Latent point(s): values separated by commas, points by ';' "
          "(e.g. '0.1,-0.4' or '0,0;1,0'). Latent-space units. A value starting with '-' needs '=': --z=-0.5,1."),
    Param("z_file", Path, None, "Latent points from a file: .npy (M, d) or text, one point a line."),
    Param("z_end", str, None, "With --z (one point): end of a straight path from --z; --n_frames maps along it."),
    Param("n_frames", int, 10, "Maps along the --z to --z_end path.", min=2),
)

#: The prepared-image cache of the methods on the shared trainer (``inference.trainer``, ``data.image_cache``).
CACHE_PARAMS = (
    Param("cache", str, "auto", "Cache the prepared (windowed, Fourier-cropped, origin-corrected) images in float16 "
          "as the first epoch reads them, for the later epochs: memory, disk (a file in the run folder or "
          "--cache_dir, removed when the run ends well), auto (memory when it fits a quarter of the free memory, "
          "else disk) or off. Size: particles × pixels in the resolution circle × 4 bytes.",
          choices=("auto", "memory", "disk", "off"), expert=True),
    Param("cache_dir", str, "", "Folder for the disk cache (kept there after the run, and reused by a run on the "
          "same particles and preparation); empty: the run folder.", expert=True),
)

#: Parameters every method takes.
COMMON_PARAMS = (
    Param("device", str, "auto", "Where to compute: auto (CUDA when present, else CPU), cpu or cuda[:N].",
          expert=True),
    Param("threads", int, 2, "CPU threads for torch.", min=1, expert=True),
    Param("seed", int, 0, "Random seed (half-sets, initialisation, simulation).", expert=True),
    Param("overwrite", bool, False, "Replace the outputs of an earlier run in this folder (without it, a folder "
          "that holds an earlier run's record is refused).", expert=True),
)


@dataclass(frozen=True)
class Method:
    """A user-facing method: ``run(params, out_dir)`` writes its outputs and returns the record.

    ``order`` places it in ``cryohet --help`` and in the hosts' lists (lower first, ties by name):
    10s make data, 20-49 fit a model, 50-79 analyse a fit, 80+ benchmark and validate.
    """

    name: str
    title: str
    help: str
    params: tuple[Param, ...]
    outputs: tuple[str, ...]
    run: Callable[[dict[str, Any], Path], Any]
    citations: tuple[str, ...] = field(default_factory=tuple)
    order: int = 1000
    #: the input particles must carry poses (all but ab initio methods)
    needs_poses: bool = True
    #: the parameters every method takes (a host's copy of a description carries the engine's own)
    common_params: tuple[Param, ...] = COMMON_PARAMS

    def all_params(self) -> tuple[Param, ...]:
        return self.params + self.common_params

    def param(self, name: str) -> Param:
        for p in self.all_params():
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and check every value; raise ValueError naming the bad parameter."""
        out = {}
        for p in self.all_params():
            v = values.get(p.name)
            out[p.name] = p.check(p.default if v is None else v)
        unknown = set(values) - {p.name for p in self.all_params()}
        if unknown:
            raise ValueError(f"unknown parameter(s) for {self.name}: {', '.join(sorted(unknown))}")
        return out


def pick_method(methods: dict[str, Method], name: str) -> Method:
    """``methods[name]``; KeyError listing the known names when there is none."""
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; the cryohet methods are: {', '.join(methods)}")
    return methods[name]
