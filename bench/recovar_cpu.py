"""RECOVAR 1.0.5's command line with its CPU projector mended; run with the Python of RECOVAR's own environment.

    /work/peers/recovar-venv/bin/python bench/recovar_cpu.py pipeline particles.star --mask sphere --zdim 4 ...
    /work/peers/recovar-venv/bin/python bench/recovar_cpu.py --check    # the mend against RECOVAR's other slicer

Without a GPU, RECOVAR 1.0.5 projects and back-projects at interpolation order 0-1 through
``recovar.core.relion_interp``, which places each image pixel at its frequency in *image* grid units even when the
volume's grid is finer (``volume_shape = upsampling × image_shape``: its RELION-style mean is estimated on a 2×
grid). Its CUDA kernel scales the frequencies, and the radius cut, by the upsampling; its ``map_coordinates`` slicer
(``core.slicing._jax_slice``, order 3) scales them too. So on a CPU the upsampled volumes come out magnified 2×.
This wrapper scales the pixel frequencies and ``max_r`` by ``volume_shape[0] // image_shape[0]`` in both
functions, as the CUDA path does, and then runs RECOVAR's own command line unchanged.

The bench scripts import this module from cryohet's environment too (``command``, ``latents``, ``state_maps``), so
RECOVAR itself is imported only where the patch is applied.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_UPSAMPLING = [1]


def command(python: str) -> list[str]:
    """The command line that runs RECOVAR, mended, with ``python`` (its environment's); append its arguments."""
    return [python, str(Path(__file__).resolve())]


def latents(pipeline: Path, zdim: int) -> np.ndarray:
    """RECOVAR's regularised per-image latents (dataset order) from a pipeline's output folder
    (model/zdim_K/latent_coords.npy, as 1.0.5 writes them)."""
    npy = pipeline / "model" / f"zdim_{zdim}" / "latent_coords.npy"
    if not npy.is_file():
        raise RuntimeError(f"{npy}: not written; RECOVAR 1.0.5's pipeline at zdim {zdim} writes it (see its log)")
    return np.load(npy)


def state_maps(states: Path, n: int) -> list[Path]:
    """The ``n`` maps that ``recovar compute_state`` wrote in ``states``, in the order of its latent points."""
    maps = [states / f"state{k:03d}.mrc" for k in range(n)]
    missing = [p for p in maps if not p.is_file()]
    if missing:
        raise RuntimeError(f"RECOVAR compute_state did not write {missing[0]} ({len(missing)} maps missing)")
    return maps


def _in_volume_units(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (relion_interp's project or backproject) with its frequencies and ``max_r`` in volume grid units."""
    signature = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        upsampling = bound.arguments["volume_shape"][0] // bound.arguments["image_shape"][0]
        if bound.arguments["max_r"] is not None:
            bound.arguments["max_r"] = bound.arguments["max_r"] * upsampling
        _UPSAMPLING[0] = upsampling
        try:
            return fn(*bound.args)  # positionally: the jitted functions' static arguments are positional
        finally:
            _UPSAMPLING[0] = 1

    return call


def mend() -> None:
    """Patch RECOVAR's CPU projector in this process."""
    from recovar.core import relion_interp

    image_frequencies = relion_interp._pixel_frequencies

    def _scaled_frequencies(image_shape: tuple[int, int], half_image: bool = False) -> Any:
        """Pixel frequencies in the volume's grid units (the image's times the call's upsampling)."""
        return image_frequencies(image_shape, half_image=half_image) * _UPSAMPLING[0]

    relion_interp._pixel_frequencies = _scaled_frequencies
    relion_interp.project = _in_volume_units(relion_interp.project)
    relion_interp.backproject = _in_volume_units(relion_interp.backproject)


def check(box: int, upsampling: int = 2) -> tuple[float, float]:
    """Relative difference between relion_interp's order-1 projection of a smooth upsampled volume and RECOVAR's
    map_coordinates slicer of the same volume (which scales the frequencies itself), and the relative mismatch of
    <P v, y> and <v, Pᵀ y> for relion_interp's projection P and back-projection Pᵀ. Each box is traced once by
    the jitted functions, so call it with a new ``box`` after ``mend``."""
    import jax.numpy as jnp
    from recovar.core import relion_interp, slicing
    from scipy.spatial.transform import Rotation

    n = box * upsampling
    k = np.fft.fftshift(np.fft.fftfreq(n)) * n
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    rng = np.random.default_rng(0)
    centre = rng.normal(size=3) * 2
    vol = np.exp(-((kx - centre[0]) ** 2 + (ky - centre[1]) ** 2 + (kz - centre[2]) ** 2) / (2 * (n / 6) ** 2))
    vol = jnp.asarray((vol * np.exp(2j * np.pi * rng.uniform())).ravel().astype(np.complex64))
    rots = jnp.asarray(Rotation.random(5, random_state=1).as_matrix().astype(np.float32))
    shape = (box, box)
    ours = relion_interp.project(vol, rots, shape, (n, n, n), 1, False, False, None)
    theirs = slicing._jax_slice(vol, rots, shape, (n, n, n), 1)
    y = jnp.asarray((rng.normal(size=ours.shape) + 1j * rng.normal(size=ours.shape)).astype(np.complex64))
    back = relion_interp.backproject(y, rots, shape, (n, n, n), 1, False, False, None)
    forward_dot, adjoint_dot = jnp.vdot(y, ours), jnp.vdot(back, vol)
    return (float(jnp.linalg.norm(ours - theirs) / jnp.linalg.norm(theirs)),
            float(abs(forward_dot - adjoint_dot) / abs(forward_dot)))


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        (before, _), _ = check(12), mend()
        after, adjoint = check(16)
        print(f"relion_interp's projection vs map_coordinates at 2x upsampling, relative difference: shipped "
              f"{before:.3f}, mended {after:.2g}; mended back-projection's adjoint mismatch {adjoint:.2g}")
        sys.exit(0 if after < 1e-3 and adjoint < 1e-3 and before > 0.5 else 1)
    mend()
    from recovar.command_line import main_commands
    sys.argv[0] = "recovar"
    sys.exit(main_commands())


if __name__ == "__main__":
    main()
