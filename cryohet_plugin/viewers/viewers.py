"""Scipion viewers for cryohet results: thin wrappers that render with ``plots`` and then show the files.

``render(obj)`` writes the figures (PNG) and scripts (ChimeraX .cxc) and returns their paths: it
needs no display and is what the tests call. ``_visualize`` turns them into views for the GUI.
"""
from __future__ import annotations

import os

import numpy as np
import pyworkflow.viewer as pwviewer
from pwem.objects import SetOfParticlesFlex

from .. import convert
from ..constants import ENGINE_DIR
from ..protocols.protocol_base import ProtCryohetBase
from . import plots


class PngView(pwviewer.View):
    """Shows PNG files in a matplotlib window."""

    def __init__(self, paths: list[str], title: str = "cryohet"):
        self._paths = list(paths)
        self._title = title

    def getPaths(self) -> list[str]:
        return self._paths

    def show(self) -> None:
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt

        for p in self._paths:
            fig = plt.figure(num=os.path.basename(p))
            ax = fig.add_axes((0, 0, 1, 1))
            ax.imshow(mpimg.imread(p))
            ax.axis("off")
        plt.show()


def _chimerax_view(script: str) -> pwviewer.View:
    try:
        from pwem.viewers.viewer_chimera import ChimeraView

        return ChimeraView(script)
    except Exception:  # no ChimeraX configured: say where the script is
        return pwviewer.MessageView(f"Open this script in ChimeraX: {script}", title="cryohet volumes")


def render_latents(z: np.ndarray, out_dir: str, prefix: str = "latent") -> list[str]:
    return [plots.latent_scatter(z, os.path.join(out_dir, f"{prefix}_scatter.png")),
            plots.latent_density(z, os.path.join(out_dir, f"{prefix}_density.png"))]


def flex_latents(parts: SetOfParticlesFlex) -> np.ndarray:
    return np.asarray([p.getZFlex() for p in parts.iterItems()], dtype=float)


class CryohetResultsViewer(pwviewer.Viewer):
    """Latent space (scatter, density), FSC curves and volume series of a cryohet run."""

    _label = "cryohet results"
    _name = _label  # what Scipion's menus show (Viewer.getName; _label only names ProtocolViewers)
    _targets = [ProtCryohetBase]
    _environments = [pwviewer.DESKTOP_TKINTER]

    def _plotDir(self, prot) -> str:
        return prot._getExtraPath("plots")

    def render(self, prot) -> dict[str, list[str]]:
        """Write every figure/script the run supports; {'png': [...], 'cxc': [...]}."""
        out_dir = prot._getExtraPath(ENGINE_DIR)
        record = convert.read_record(out_dir)
        outs = convert.outputs_by_kind(record, out_dir)
        pdir = self._plotDir(prot)
        pngs: list[str] = []
        cxcs: list[str] = [o["abspath"] for o in outs.get("chimerax", [])]
        if outs.get("latents"):
            pngs += render_latents(convert.load_latents(outs["latents"][0]["abspath"]), pdir)
        for i, f in enumerate(outs.get("fsc", [])):
            try:
                freq, curves = convert.read_fsc(f["abspath"])
            except (OSError, ValueError):
                continue  # not a curve (e.g. JSON metrics)
            pngs.append(plots.fsc_plot(freq, curves, os.path.join(pdir, f"fsc_{i + 1}.png")))
        series = outs.get("volume_series", [])
        if series:
            apix = convert.map_sampling(series[0]["abspath"])
            cxcs.append(plots.chimerax_series([o["abspath"] for o in series],
                                              os.path.join(pdir, "volume_series.cxc"), apix=apix))
        elif outs.get("volume"):
            cxcs.append(plots.chimerax_series([o["abspath"] for o in outs["volume"]],
                                              os.path.join(pdir, "volumes.cxc"), play=False))
        pngs += [o["abspath"] for o in outs.get("plot", []) if o["abspath"].lower().endswith(".png")]
        reports = [o["abspath"] for o in outs.get("report", [])]
        return {"png": pngs, "cxc": cxcs, "report": reports}

    def _visualize(self, obj, **kwargs) -> list[pwviewer.View]:
        files = self.render(obj)
        views: list[pwviewer.View] = []
        if files["png"]:
            views.append(PngView(files["png"], title=obj.getRunName()))
        views += [_chimerax_view(c) for c in files["cxc"]]
        if files["report"]:
            views.append(pwviewer.TextView(files["report"], title="cryohet report"))
        return views or [pwviewer.MessageView("This run has no figures.", title="cryohet")]


class CryohetFlexViewer(pwviewer.Viewer):
    """Latent-space scatter and density of particles with latent coordinates (zFlex)."""

    _label = "latent space (cryohet)"
    _name = _label
    _targets = [SetOfParticlesFlex]
    _environments = [pwviewer.DESKTOP_TKINTER]

    def render(self, parts: SetOfParticlesFlex, out_dir: str | None = None) -> list[str]:
        out_dir = out_dir or os.path.join(self._tmpPath, "cryohet_latents")
        return render_latents(flex_latents(parts), out_dir, prefix=f"latent_{parts.getObjId() or 'set'}")

    def _visualize(self, obj, **kwargs) -> list[pwviewer.View]:
        return [PngView(self.render(obj), title="latent space")]
