"""The base of every cryohet protocol: convert inputs, run the engine, register its outputs.

Each engine method gets a small subclass (see ``generated.py``) whose form is built from the
method's description; everything else is shared and driven by the run record.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
from pwem.objects import (
    FSC,
    AtomStruct,
    NormalMode,
    ParticleFlex,
    SetOfNormalModes,
    SetOfParticles,
    SetOfParticlesFlex,
    Volume,
    VolumeMask,
)
from pwem.protocols import EMProtocol
from pwem.protocols.protocol_base_flexhub import ProtFlexBase

from cryohet.errors import InputError
from cryohet.record import convergence_warning, run_state

from .. import convert
from ..constants import ENGINE_DIR, HOST_FILLED, INPUT_DIR, INPUT_PARTICLES, POINTER_CLASSES, PROGRAM_NAME
from .forms import define_form

#: ``content`` of the latents outputs that are per-particle coordinates (not PCA, UMAP or cluster labels).
LATENT_CONTENT = (None, "", "z", "latent", "latents", "body_motions")


class EngineError(Exception):
    """The engine failed; the message is its own reason."""


def _exitText(rc: int) -> str:
    """How a process ended, from its return code (negative: killed by that signal)."""
    return f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"


def _plugin():
    from .. import Plugin

    return Plugin


def _method_description(name: str):
    from ..descriptions import get_description

    return get_description(_plugin(), name)


class ProtCryohetBase(EMProtocol, ProtFlexBase):
    """Runs one cryohet method (``_methodName``) on Scipion objects."""

    _methodName: str = ""
    #: Scipion attribute name of each method parameter shown in the form.
    _paramAttrs: dict[str, str] = {}
    _label = None  # a base class: not offered in Scipion's protocol list

    # ------------------------------------------------------------------ description
    @classmethod
    def getMethod(cls):
        return _method_description(cls._methodName)

    @classmethod
    def _roleAttrs(cls) -> dict[str, str]:
        """Input role -> Scipion attribute of the pointer."""
        m = cls.getMethod()
        return {p.input_role: cls._paramAttrs[p.name] for p in m.params
                if p.input_role in POINTER_CLASSES and p.name in cls._paramAttrs}

    def _particlesSource(self) -> ProtCryohetBase | None:
        """The protocol whose converted particles this run works on: itself, or the earlier cryohet run."""
        roles = self._roleAttrs()
        if "particles" in roles and ("run" not in roles or getattr(self, roles["particles"]).get() is not None):
            return self
        upstream = getattr(self, roles["run"]).get() if "run" in roles else None
        return upstream._particlesSource() if isinstance(upstream, ProtCryohetBase) else None

    def _inputParticles(self) -> SetOfParticles | None:
        """The Scipion particles behind this run (also through an earlier cryohet run it analyses)."""
        src = self._particlesSource()
        return getattr(src, src._roleAttrs()["particles"]).get() if src is not None else None

    # ------------------------------------------------------------------ form
    def _defineParams(self, form) -> None:
        define_form(self, form)

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self) -> None:
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.runEngineStep)
        self._insertFunctionStep(self.createOutputStep)

    def _engineDir(self, *paths: str) -> str:
        return self._getExtraPath(ENGINE_DIR, *paths)

    def convertInputStep(self) -> None:
        """Write the inputs where the engine reads them (STAR for particles, MRC for maps)."""
        os.makedirs(self._getExtraPath(INPUT_DIR), exist_ok=True)
        for role, attr in self._roleAttrs().items():
            obj = getattr(self, attr).get()
            if obj is None:
                continue
            if role in ("run", "atomic_model"):  # an earlier run's folder, a PDB/mmCIF file: read where they are
                continue
            if role == "particles":
                convert.write_particles_star(obj, self._getExtraPath(INPUT_DIR, INPUT_PARTICLES),
                                             self._getExtraPath(INPUT_DIR, "stacks"))
            else:
                self._mapFile(obj, role)

    def _mapFile(self, vol, role: str) -> str:
        """An MRC file of ``vol`` for the engine (converted when not MRC)."""
        fn = vol.getFileName()
        path = fn.split(":")[0]
        if path.lower().endswith((".mrc", ".map")) and vol.getIndex() in (None, 0, 1):
            return os.path.abspath(path)
        target = self._getExtraPath(INPUT_DIR, f"{role}.mrc")
        if not os.path.exists(target):
            from pwem.emlib.image import ImageHandler

            ImageHandler().convert(vol, target)
        return os.path.abspath(target)

    def engineArgs(self) -> list[str]:
        """The engine's command-line arguments (after ``cryohet``) from the form's values."""
        m = self.getMethod()
        # every option as one "--flag=value" argument: a value such as "-1,0" is not taken for a flag
        args = [m.name, f"--o={os.path.abspath(self._engineDir())}"]
        for p in m.all_params():
            attr = self._paramAttrs.get(p.name)
            if attr is None or p.name in HOST_FILLED:
                continue
            value = self._paramText(p, getattr(self, attr))
            if value is not None:
                args.append(f"{p.flag}={value}")
        args.append(f"--threads={max(1, self.numberOfThreads.get() or 1)}")
        args.append(f"--device={'auto' if self.usesGpu() else 'cpu'}")
        args.append("--overwrite=yes")
        return args

    def _paramText(self, p, obj) -> str | None:
        if p.input_role in POINTER_CLASSES:
            target = obj.get()
            if target is None:
                return None
            if p.input_role == "particles":
                return os.path.abspath(self._getExtraPath(INPUT_DIR, INPUT_PARTICLES))
            if p.input_role == "run":
                return os.path.abspath(target._getExtraPath(ENGINE_DIR))
            if p.input_role == "atomic_model":
                return os.path.abspath(target.getFileName())
            return self._mapFile(target, p.input_role)
        value = obj.get()
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        if p.type is bool:
            return "yes" if value else "no"
        if p.choices is not None:
            return str(p.choices[int(value)])
        return str(value)

    def runEngineStep(self) -> None:
        """Run the engine as a separate process; its output goes to this run's log."""
        plugin = _plugin()
        cmd = plugin.getEngineCommand(self.engineArgs())
        gpus = self.getGpuList() if self.usesGpu() else None
        env = plugin.getEnviron(gpus)
        env.setdefault("CRYOHET_NO_PROGRESS", "0")
        self.info("Running: " + plugin.describeCommand(cmd))
        tail: collections.deque[str] = collections.deque(maxlen=30)
        sys.stdout.flush()
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", cwd=os.getcwd()) as proc:
            for line in proc.stdout:
                sys.stdout.write(line)
                tail.append(line.rstrip())
            sys.stdout.flush()
            rc = proc.wait()
        if rc != 0:
            raise EngineError(self._failureReason(rc, list(tail)))

    def _failureReason(self, rc: int, tail: list[str]) -> str:
        """The engine's own reason (its run record's error), else the last error line of its output."""
        record, state = self._recordState()
        reason = record.get("error") if state in ("failed", "aborted", "died") else None
        if state == "died" and not reason:
            reason = f"the engine's process ended without finishing its run ({_exitText(rc)})"
        if not reason:
            errs = [t for t in tail if "error" in t.lower()]
            reason = errs[-1] if errs else (tail[-1] if tail else _exitText(rc))
        return f"cryohet {self._methodName} failed: {reason}"

    def _recordState(self) -> tuple[dict[str, Any], str]:
        """(the engine's run record, or {} when unreadable; the run's state as ``cryohet.record.run_state``
        tells it: running, finished, failed, aborted, died, or none)."""
        try:
            return convert.read_record(self._engineDir()), run_state(self._engineDir())
        except (OSError, ValueError, InputError):
            return {}, "none"

    # ------------------------------------------------------------------ outputs
    def createOutputStep(self) -> None:
        """Register the outputs listed in the engine's run record as typed Scipion objects."""
        out_dir = self._engineDir()
        record = convert.read_record(out_dir)
        if record.get("status") != "finished":
            raise EngineError(f"cryohet {self._methodName} did not finish: {record.get('error')}")
        outs = convert.outputs_by_kind(record, out_dir)
        parts_in = self._inputParticles()
        sources = [o for o in (parts_in,) if o is not None]
        defined: dict[str, Any] = {}

        sampling = parts_in.getSamplingRate() if parts_in is not None else None
        vols = outs.get("volume", [])
        halves = outs.get("half_map", [])
        if len(vols) == 1:
            vol = self._newVolume(Volume, vols[0], sampling)
            if len(halves) == 2:
                vol.setHalfMaps([h["file"] for h in halves])
            defined["outputVolume"] = vol
        elif vols:
            defined["outputVolumes"] = self._volumeSet(vols, sampling, "", halves)
        series: dict[str, list[dict]] = {}
        for out in outs.get("volume_series", []):
            series.setdefault(str(out.get("meta", {}).get("series", "")), []).append(out)
        for i, (name, members) in enumerate(series.items()):  # the first series keeps the plain name
            suffix = "" if i == 0 else name[:1].upper() + name[1:]
            defined[f"outputVolumeSeries{suffix}"] = self._volumeSet(members, sampling, f"series{suffix}")
        masks = outs.get("mask", [])
        if len(masks) == 1:
            defined["outputMask"] = self._newVolume(VolumeMask, masks[0], sampling)
        elif masks:
            defined["outputMasks"] = self._volumeSet(masks, sampling, "masks", cls=VolumeMask)

        models = outs.get("atomic_model", [])
        if len(models) == 1:
            defined["outputAtomStruct"] = self._atomStruct(models[0])
        elif models:
            structs = self._createSetOfPDBs("models")
            for out in models:
                structs.append(self._atomStruct(out))
            defined["outputAtomStructs"] = structs
        mode_files = [o for o in outs.get("normal_modes", []) if o["path"].endswith(".npz")]  # (not the tables)
        for i, out in enumerate(mode_files):
            defined["outputModes" if i == 0 else f"outputModes{i + 1}"] = self._normalModes(
                out, self._inputAtomStruct(), i)

        latents = [o for o in outs.get("latents", []) if o["meta"].get("content") in LATENT_CONTENT]
        stars = outs.get("particles_star", [])
        if parts_in is None:
            for i, star in enumerate(stars):
                name = "outputParticles" if i == 0 else f"outputParticles{i + 1}"
                defined[name] = self._importParticles(star, name)
        else:
            ids_in = convert.particle_ids(self._particlesSource()._getExtraPath(INPUT_DIR, INPUT_PARTICLES)) or []
            z = convert.load_latents(latents[0]["abspath"]) if latents else None
            zmap = dict(zip(ids_in, z)) if z is not None and len(z) == len(ids_in) else None
            if z is not None and zmap is None:
                raise EngineError(f"{latents[0]['abspath']}: {len(z)} rows for {len(ids_in)} input particles")
            if zmap is not None:
                defined["outputParticlesFlex"] = self._flexParticles(parts_in, zmap, latents[0], None, "")
            class_maps = {int(o["meta"]["class_number"]): o for o in outs.get("volume_series", [])
                          if "class_number" in o.get("meta", {})}
            for i, star in enumerate(stars):
                if star.get("meta", {}).get("poses"):
                    defined["outputParticles" if i == 0 else f"outputParticles{i + 1}"] = \
                        self._particlesWithPoses(parts_in, star)
                    continue
                if class_maps and "class_number" in star.get("meta", {}):
                    continue  # one class's particles: a class of the SetOfClasses3D below
                ids = convert.particle_ids(star["abspath"])
                if ids is None:
                    self.warning(f"{star['abspath']}: no particle id column; not registered")
                    continue
                classes = convert.column(star["abspath"], "rlnClassNumber")
                if classes is not None and class_maps:
                    defined[f"outputClasses{i + 1 if i else ''}"] = self._classes3D(parts_in, ids, classes,
                                                                                    class_maps, halves)
                    continue
                class_z = (None, None)
                if classes is not None and len(set(classes)) > 1:
                    class_z = (zmap, latents[0]) if zmap is not None else self._upstreamLatents(ids_in)
                if class_z[0] is not None:
                    defined[f"outputClasses{i + 1 if i else ''}"] = self._classes(
                        parts_in, *class_z, ids, classes, outs.get("volume_series", []))
                elif set(ids) != set(ids_in):
                    subset = self._flexParticles(parts_in, zmap, latents[0], set(ids), f"subset{i}") \
                        if zmap is not None else self._subset(parts_in, set(ids), f"subset{i}")
                    defined[self._subsetName(star, i)] = subset
                else:
                    self.info(f"{star['path']}: same particles as the input; nothing new to register")

        fscs = None
        for f in outs.get("fsc", []):
            try:
                freq, curves = convert.read_fsc(f["abspath"])
            except (OSError, ValueError) as exc:  # other FSC-like tables (e.g. JSON metrics) stay files
                self.info(f"{f['path']}: kept as a file ({exc})")
                continue
            fscs = fscs or self._createSetOfFSCs()
            for label, curve in curves.items():
                item = FSC(objLabel=f"{f.get('label') or os.path.basename(f['path'])}: {label}")
                item.setData(freq.tolist(), curve.tolist())
                fscs.append(item)
        if fscs is not None:
            defined["outputFSC"] = fscs

        if not defined:
            self.info(f"cryohet {self._methodName}: no outputs to register as Scipion objects; "
                      f"its files are in {out_dir} (see the summary)")
            return
        self._defineOutputs(**defined)
        for obj in defined.values():
            for src in sources:
                self._defineSourceRelation(src, obj)

    def _subsetName(self, star: dict, i: int) -> str:
        label = re.sub(r"[^A-Za-z0-9]", "", (star.get("label") or "").title())
        return f"outputParticles{label or 'Subset'}{'' if label else i + 1}"

    def _newVolume(self, cls, out: dict, sampling: float | None):
        vol = cls()
        vol.setFileName(out["file"])  # relative to the project, as Scipion keeps its own files
        vol.setSamplingRate(convert.map_sampling(out["abspath"]) or sampling or 1.0)
        if out.get("label"):
            vol.setObjLabel(out["label"])
        return vol

    @staticmethod
    def _atomStruct(out: dict) -> AtomStruct:
        struct = AtomStruct(filename=out["file"])
        if out.get("label"):
            struct.setObjLabel(out["label"])
        return struct

    def _inputAtomStruct(self) -> AtomStruct | None:
        attr = self._roleAttrs().get("atomic_model")
        return getattr(self, attr).get() if attr is not None else None

    def _normalModes(self, out: dict, reference: AtomStruct | None, index: int) -> SetOfNormalModes:
        """Scipion's normal modes (as ContinuousFlex keeps them: one text file per mode, a row (x, y, z) per network
        node) from the engine's ``modes.npz``; ``reference``: the atomic model they were computed from."""
        folder = self._getExtraPath(f"modes{index + 1 if index else ''}")
        os.makedirs(folder, exist_ok=True)
        modes = self._createSetOfNormalModes(str(index + 1) if index else "")
        if reference is not None:
            modes.setPdb(reference)
        for k, (vec, coll) in enumerate(zip(*convert.read_modes(out["abspath"])), start=1):
            path = os.path.join(folder, f"vec.{k}")
            np.savetxt(path, vec, fmt="%.8f")
            modes.append(NormalMode(modeFile=path, collectivity=float(coll), objId=k))
        return modes

    def _volumeSet(self, outs: list[dict], sampling: float | None, suffix: str, halves: list[dict] = (),
                   cls=Volume):
        """A SetOfVolumes of ``outs``; a map gets as half-maps the two ``halves`` whose meta ``of`` names its path
        or whose meta ``body`` is its own."""
        vset = self._createSetOfVolumes(suffix)
        first = None
        for out in outs:
            vol = self._newVolume(cls, out, sampling)
            body = out.get("meta", {}).get("body")
            pair = [h["file"] for h in halves if h.get("meta", {}).get("of") == out["path"]
                    or (body is not None and h.get("meta", {}).get("body") == body)]
            if len(pair) == 2:
                vol.setHalfMaps(pair)
            first = first or vol.getSamplingRate()
            vset.append(vol)
        vset.setSamplingRate(first)
        return vset

    def _importParticles(self, star: dict, name: str) -> SetOfParticles:
        parts = self._createSetOfParticles(name.replace("outputParticles", ""))
        convert.read_particles_star(star["abspath"], parts)
        return parts

    def _particlesWithPoses(self, parts_in, star: dict) -> SetOfParticles:
        """The input particles (ids, CTF, acquisition kept) with the poses the engine found: its STAR, read by
        scipion-em-relion's converter, holds one row per input particle in input order."""
        found = SetOfParticles(filename=self._getTmpPath("poses.sqlite"))
        convert.read_particles_star(star["abspath"], found)
        if found.getSize() != parts_in.getSize():
            raise EngineError(f"{star['abspath']}: {found.getSize()} rows for {parts_in.getSize()} input particles")
        out = self._createSetOfParticles()
        out.copyInfo(parts_in)
        out.setAlignmentProj()
        for part, posed in zip(parts_in.iterItems(orderBy="id"), found.iterItems(orderBy="id")):
            new = part.clone()
            new.setTransform(posed.getTransform())
            out.append(new)
        found.close()
        return out

    def _subset(self, parts_in, ids: set[int], suffix: str) -> SetOfParticles:
        subset = self._createSetOfParticles(suffix)
        subset.copyInfo(parts_in)
        for part in parts_in.iterItems():
            if part.getObjId() in ids:
                subset.append(part)
        return subset

    def _flexInfo(self, flex_set, latent_out: dict, dim: int) -> None:
        info = flex_set.getFlexInfo()
        info.setProgName(PROGRAM_NAME)
        info.setAttr("method", self._methodName)
        info.setAttr("zDim", int(dim))
        info.setAttr("runRecord", self._engineDir(convert.RECORD_NAME))
        info.setAttr("latentsFile", latent_out["file"])

    def _flexParticles(self, parts_in, zmap: dict, latent_out: dict, ids: set[int] | None,
                       suffix: str) -> SetOfParticlesFlex:
        flex = self._createSetOfParticlesFlex(suffix, progName=PROGRAM_NAME)
        flex.copyInfo(parts_in)
        flex.setHasCTF(parts_in.hasCTF())
        flex.setAlignment(parts_in.getAlignment())
        dim = len(next(iter(zmap.values()))) if zmap else 0
        self._flexInfo(flex, latent_out, dim)
        for part in parts_in.iterItems():
            pid = part.getObjId()
            if ids is not None and pid not in ids:
                continue
            item = ParticleFlex(progName=PROGRAM_NAME)
            item.copyInfo(part)
            item.setObjId(pid)
            item.setZFlex(np.asarray(zmap[pid]).tolist())
            flex.append(item)
        return flex

    def _upstreamLatents(self, ids_in: list[int]) -> tuple[dict | None, dict | None]:
        """(Scipion id -> latent, latent output) of the earlier cryohet run this one analyses, else (None, None)."""
        roles = self._roleAttrs()
        upstream = getattr(self, roles["run"]).get() if "run" in roles else None
        if not isinstance(upstream, ProtCryohetBase):
            return None, None
        out_dir = upstream._engineDir()
        outs = convert.outputs_by_kind(convert.read_record(out_dir), out_dir)
        latents = [o for o in outs.get("latents", []) if o["meta"].get("content") in LATENT_CONTENT]
        z = convert.load_latents(latents[0]["abspath"]) if latents else None
        if z is None or len(z) != len(ids_in):
            return None, None
        return dict(zip(ids_in, z)), latents[0]

    def _classes(self, parts_in, zmap: dict, latent_out: dict, ids: list[int], classes: list[str],
                 series: list[dict]):
        """SetOfClassesFlex from RELION class numbers (1..K); representatives: maps with meta ``cluster``
        (0-based, e.g. the maps at k-means centres)."""
        flex = self._flexParticles(parts_in, zmap, latent_out, set(ids), "classes")
        reps = {int(o["meta"]["cluster"]) + 1: o for o in series if "cluster" in o.get("meta", {})}
        flex.write()
        return self._fillClasses(self._createSetOfClassesFlex(flex, progName=PROGRAM_NAME), ids, classes, reps,
                                 parts_in.getSamplingRate())

    def _classes3D(self, parts_in, ids: list[int], classes: list[str], class_maps: dict[int, dict],
                   halves: list[dict]):
        """SetOfClasses3D of the input particles from RELION class numbers (1..K), each class's map (with its
        half-maps) as its representative (a class without particles is left out: Scipion holds no empty class)."""
        half_files: dict[int, list[str]] = collections.defaultdict(list)
        for h in halves:
            if "class_number" in h.get("meta", {}):
                half_files[int(h["meta"]["class_number"])].append(h["file"])
        return self._fillClasses(self._createSetOfClasses3D(parts_in), ids, classes, class_maps,
                                 parts_in.getSamplingRate(), half_files)

    @staticmethod
    def _fillClasses(classes_set, ids: list[int], classes: list[str], reps: dict[int, dict], sampling: float,
                     half_files: dict[int, list[str]] | None = None):
        """Put each particle in the class its RELION class number names; class k's representative is the map
        ``reps[k]`` (with its two half-maps when ``half_files`` has them)."""
        klass_of = {pid: int(float(c)) for pid, c in zip(ids, classes)}

        def update_item(item, _row=None) -> None:
            item.setClassId(klass_of.get(item.getObjId(), 0))

        def update_class(cls, _row=None) -> None:
            rep = reps.get(cls.getObjId())
            if rep is None:
                return
            cls.getRepresentative().setLocation(rep["file"])
            cls.getRepresentative().setSamplingRate(convert.map_sampling(rep["abspath"]) or sampling)
            if half_files is not None:
                if len(half_files[cls.getObjId()]) == 2:
                    cls.getRepresentative().setHalfMaps(half_files[cls.getObjId()])
                cls.setObjLabel(rep.get("label") or f"class {cls.getObjId()}")

        classes_set.classifyItems(updateItemCallback=update_item, updateClassCallback=update_class)
        return classes_set

    # ------------------------------------------------------------------ info
    def _validate(self) -> list[str]:
        errors = []
        plugin = _plugin()
        errors += plugin.validateInstallation()
        parts = self._inputParticles()
        if parts is not None:
            if not parts.hasCTF():
                errors.append("The input particles have no CTF: cryohet needs CTF parameters "
                              "(import them with their CTF, or estimate it first).")
            if self.getMethod().needs_poses and not parts.hasAlignmentProj():
                errors.append("The input particles have no 3D alignment (projection angles and shifts): "
                              "run a 3D refinement first.")
        m = self.getMethod()
        for p in m.all_params():
            attr = self._paramAttrs.get(p.name)
            if attr is None or p.input_role in POINTER_CLASSES:
                continue
            text = self._paramText(p, getattr(self, attr))
            try:
                p.check(text)
            except ValueError as exc:
                errors.append(str(exc))
        return errors

    def _summary(self) -> list[str]:
        record, state = self._recordState()
        if not record:
            return [f"cryohet {self._methodName}: no results yet."]
        lines = [f"cryohet {record.get('version', '')} {self._methodName}: {state}"]
        if record.get("error"):
            lines.append(f"Error: {record['error']}")
        warnings = (convergence_warning(c) for c in record.get("convergence", []))
        lines += [f"Warning: {w}" for w in warnings if w]
        for out in record["outputs"]:
            meta = out.get("meta") or {}
            extra = ", ".join(f"{k}={v}" for k, v in meta.items() if isinstance(v, int | float | str))
            lines.append(f"{out['kind']}: {out.get('label') or out['path']}" + (f" ({extra})" if extra else ""))
        return lines

    def _methods(self) -> list[str]:
        m = self.getMethod()
        text = f"{m.title} (cryohet {m.name}): {m.help}"
        try:
            record = convert.read_record(self._engineDir())
            used = ", ".join(f"{k}={v}" for k, v in record.get("params", {}).items()
                             if k not in HOST_FILLED and not str(v).startswith("/"))
            text += f" Parameters: {used}."
        except (OSError, ValueError):
            pass
        return [text]

    def _citations(self) -> list[str]:
        return list(self.getMethod().citations)

    def _getCite(self, citeStr: str) -> str:
        """Citations are free text in the method descriptions; use them as they are."""
        bib = getattr(sys.modules.get("cryohet_plugin"), "_bibtex", None) or {}
        return self._getCiteText(bib[citeStr]) if citeStr in bib else citeStr
