"""RELION 5 / CCP-EM pipeliner jobs: one job type per cryohet method, made from its description.

The pipeliner finds job types through the ``ccpem_pipeliner.jobs`` entry points. setup.py lists one per module of
``cryohet/methods`` (``cryohet.<module> = cryohet.pipeliner_jobs:<module>``, found on disk as the method registry
finds them); the job class is made here on first access (``__getattr__``), from that module's ``METHOD``:

* job options from the parameters: inputs by role as input nodes (particles, map, mask, and an earlier cryohet
  run through its run record), numbers with their hard ranges, choices, booleans, other text and paths; expert
  parameters in the *Expert* group; threads from the Running tab;
* one command, an argument list: ``<python> -m cryohet.pipeliner_engine <method> --o <job dir> --<param> <value>
  ...`` (the engine's side, ``pipeliner_engine.py``: the log to ``run.out``, errors to ``run.err``), where python
  is ``CRYOHET_PYTHON`` (the engine's environment, as for the other hosts) or this one;
* output nodes after the run, from its run record, with the RELION 4/5 node types of the External job
  (``relion_external.NODE_TYPES``: ``ParticleGroupMetadata.star.relion``, ``DensityMap.mrc``,
  ``DensityMap.mrc.halfmap``, ``Mask3D.mrc``, ``Image3D.mrc.localresmap``, ``LogFile.pdf``), and the run record
  itself (``ProcessData.json.cryohet.run``), the input of the methods that analyse an earlier run;
* results displays: slices of the maps and a 3-D view of the first ones, the record's plots as images (PDFs as
  PDFs), the reports, the list of outputs.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from pipeliner.display_tools import (
    create_results_display_object,
    make_map_model_thumb_and_display,
    make_mrcs_central_slices_montage,
)
from pipeliner.external_program_utils import ExternalProgram
from pipeliner.job_options import (
    BooleanJobOption,
    FileDescription,
    FloatJobOption,
    InputNodeJobOption,
    IntJobOption,
    JobOption,
    MultipleChoiceJobOption,
    StringJobOption,
)
from pipeliner.node_factory import create_node
from pipeliner.nodes import NODE_ATOMCOORDS, NODE_DENSITYMAP, NODE_MASK3D, NODE_PARTICLEGROUPMETADATA, NODE_PROCESSDATA
from pipeliner.pipeliner_job import PipelinerCommand, PipelinerJob, Ref
from pipeliner.results_display_objects import ResultsDisplayObject

from cryohet import __version__
from cryohet.methods import method_modules, method_of
from cryohet.methods.base import Method, Param
from cryohet.record import RECORD_NAME, RunRecord, read_record
from cryohet.relion_external import ENGINE_PYTHON, RELION_DEFAULTS, output_nodes

#: Process names are ``cryohet.<module of cryohet/methods>``.
PREFIX = "cryohet."
#: The node of a job's run record (``ProcessData.json.cryohet.run``): what the methods that take an earlier run
#: (``input_role="run"``) take as input; the engine is given its folder.
RECORD_NODE = (NODE_PROCESSDATA, ["cryohet", "run"])
#: Input role -> (node type, its keywords, accepted files).
INPUT_NODES = {
    "particles": (NODE_PARTICLEGROUPMETADATA, [], FileDescription("RELION STAR or cryoSPARC .cs", [".star", ".cs"])),
    "volume": (NODE_DENSITYMAP, [], FileDescription("MRC map", [".mrc"])),
    "mask": (NODE_MASK3D, [], FileDescription("MRC mask", [".mrc"])),
    "run": (*RECORD_NODE, FileDescription("cryohet run record", [RECORD_NAME], exact=True)),
    "atomic_model": (NODE_ATOMCOORDS, [], FileDescription("PDB or mmCIF atomic model", [".pdb", ".ent", ".cif",
                                                                                        ".mmcif"])),
}
#: Parameters the job fills itself: threads from the Running tab; the job folder belongs to the job, so running
#: it again replaces the earlier run (as for the External job).
JOB_FILLED = ("threads", "overwrite")
#: Plots shown as images, maps in the slices montage and maps in a 3-D view, at most (the rest stay in the job
#: folder): a method may make tens of maps.
MAX_IMAGES = 12
MAX_MONTAGE = 24
MAX_3D = 3


def engine_python() -> str:
    """The python that runs the engine: ``CRYOHET_PYTHON``, else this one."""
    return os.environ.get(ENGINE_PYTHON, "").strip() or sys.executable


def _group(p: Param) -> str:
    return "Expert" if p.expert else "Main"


def job_option(p: Param) -> JobOption:
    """The pipeliner job option of one method parameter (label = its name, as on the command line)."""
    common = {"label": p.name, "help_text": p.help, "jobop_group": _group(p)}
    if p.input_role in INPUT_NODES:
        node_type, kwds, pattern = INPUT_NODES[p.input_role]
        if p.input_role == "run":
            common["help_text"] += f" Here: the {RECORD_NAME} of an earlier cryohet job (or of any cryohet run)."
        return InputNodeJobOption(node_type=node_type, node_kwds=kwds, pattern=pattern, is_required=p.required,
                                  **common)
    if p.type is bool:
        return BooleanJobOption(default_value=bool(p.default), **common)
    if p.choices is not None:
        return MultipleChoiceJobOption(choices=[str(c) for c in p.choices], default_value=str(p.default),
                                       is_required=p.required, **common)
    if p.type in (int, float):
        cls = IntJobOption if p.type is int else FloatJobOption
        return cls(default_value=p.default, hard_min=p.min, hard_max=p.max, is_required=p.required, **common)
    return StringJobOption(default_value="" if p.default is None else str(p.default), is_required=p.required,
                           **common)


def _citation(text: str) -> Ref:
    """A pipeliner reference from a description's free-text citation, ``Authors (year) Title. Journal ...``."""
    m = re.match(r"(?P<authors>.+?)\s*\((?P<year>(?:19|20)\d\d)\)\s*(?P<rest>.+)", text)
    if m is None:
        return Ref(title=text, journal=text, year="-")
    title, sep, journal = m["rest"].partition(". ")
    if not sep or len(title.split()) < 4:  # no title before the journal ("J. Mol. Biol. 224:159")
        title = journal = m["rest"]
    return Ref(authors=m["authors"], title=title, journal=journal, year=m["year"])


class CryohetJob(PipelinerJob):
    """A cryohet method as a pipeliner job (subclassed per method by ``job_class``)."""

    METHOD: Method
    OUT_DIR = "Cryohet"
    CATEGORY_LABEL = "Continuous heterogeneity"

    def __init__(self) -> None:
        super().__init__()
        m = self.METHOD
        self.jobinfo.display_name = f"cryohet {m.name}"
        self.jobinfo.version = __version__
        self.jobinfo.short_desc = m.title
        self.jobinfo.long_desc = m.help
        self.jobinfo.programs = [ExternalProgram(command=engine_python())]
        self.jobinfo.references = [_citation(c) for c in m.citations]
        for p in m.all_params():
            if p.name not in JOB_FILLED:
                self.joboptions[p.name] = job_option(p)
        self.get_runtab_options(threads="threads" in {p.name for p in m.all_params()})

    def _values(self) -> dict[str, str]:
        """Parameter -> command-line text, for every option that has a value."""
        values = {}
        for p in self.METHOD.all_params():
            if p.name in JOB_FILLED:
                continue
            raw = self.joboptions[p.name].get_string()
            if p.type is bool:
                values[p.name] = "yes" if raw.strip().lower() in ("yes", "true", "1") else "no"
            elif raw.strip() != "":
                values[p.name] = raw.strip()
                if p.input_role == "run" and Path(values[p.name]).name == RECORD_NAME:
                    values[p.name] = Path(values[p.name]).parent.as_posix()  # the engine takes the run's folder
        names = {p.name for p in self.METHOD.all_params()}
        if "threads" in names:
            values["threads"] = str(self.get_nr_threads())
        values.update({k: v for k, v in RELION_DEFAULTS.items() if k in names})
        return values

    def get_commands(self) -> list[PipelinerCommand]:
        cmd = [engine_python(), "-m", "cryohet.pipeliner_engine", self.METHOD.name, "--o", self.output_dir]
        for name, value in self._values().items():
            cmd += [f"--{name}", value]
        return [PipelinerCommand(cmd)]

    def _record_node_name(self) -> str:
        return str(Path(self.output_dir) / RECORD_NAME)

    def create_output_nodes(self) -> None:
        """Before the run, the run record only, whatever the method (so a job on this one's run may be scheduled
        before it runs); the other outputs are known from the record after the run (``create_post_run_output_nodes``).
        """
        self.add_output_node(RECORD_NAME, *RECORD_NODE)

    def _record(self) -> RunRecord | None:
        try:
            return read_record(Path(self.output_dir))
        except (OSError, ValueError, KeyError):
            return None

    def create_post_run_output_nodes(self) -> None:
        record = self._record()
        if record is None:
            return
        for name, _relion31_type, label in output_nodes(record, self.output_dir):
            top, _ext, *kwds = label.split(".")
            self.output_nodes.append(create_node(filename=name, nodetype=top, kwds=kwds))
        if self._record_node_name() not in {n.name for n in self.output_nodes}:
            self.output_nodes.append(create_node(self._record_node_name(), *RECORD_NODE))

    def create_results_display(self) -> list[ResultsDisplayObject]:
        record = self._record()
        if record is None:
            return []
        job = Path(self.output_dir)
        # single maps first, then the series (maps along motions, at cluster centres, ...)
        maps = [o for kind in ("volume", "volume_series") for o in record.outputs if o.kind == kind]
        shown: list[ResultsDisplayObject] = []
        if maps:
            shown.append(make_mrcs_central_slices_montage(
                in_files={str(job / o.path): o.label or o.path for o in maps[:MAX_MONTAGE]},
                output_dir=self.output_dir))
            for o in maps[:MAX_3D]:
                shown.append(make_map_model_thumb_and_display(
                    outputdir=self.output_dir, maps=[str(job / o.path)], title=o.label or o.path))
        figures = [o for o in record.outputs if o.kind in ("plot", "report")]
        for o in figures:
            path, title = str(job / o.path), o.label or o.path
            suffix = Path(o.path).suffix.lower()
            if suffix == ".pdf":
                shown.append(create_results_display_object("pdffile", title=title, file_path=path))
            elif suffix == ".png" and o.kind == "plot" and sum(d.dobj_type == "image" for d in shown) < MAX_IMAGES:
                shown.append(create_results_display_object(
                    "image", title=title, image_path=path, image_desc=f"cryohet {self.METHOD.name}: {o.path}",
                    associated_data=[path]))
            elif suffix == ".json" and o.kind == "report":
                shown.append(create_results_display_object("json", title=title, file_path=path))
            elif o.kind == "report":
                shown.append(create_results_display_object("textfile", title=title, file_path=path))
        shown.append(create_results_display_object(
            "text", title="Outputs", display_data=json.dumps(
                [{"kind": o.kind, "path": o.path, "label": o.label} for o in record.outputs], indent=1),
            associated_data=[str(job / RECORD_NAME)]))
        return shown


def job_class(module: str) -> type[CryohetJob]:
    """The job class of ``cryohet.methods.<module>`` (AttributeError when there is no such method)."""
    method = method_of(module) if module in method_modules() else None
    if method is None:
        raise AttributeError(f"cryohet.methods.{module} defines no METHOD")
    name = "Cryohet" + "".join(w.capitalize() for w in module.split("_")) + "Job"
    return type(name, (CryohetJob,), {"METHOD": method, "PROCESS_NAME": PREFIX + module, "__module__": __name__})


_classes: dict[str, type[CryohetJob]] = {}


def __getattr__(module: str) -> type[CryohetJob]:
    if module.startswith("__"):
        raise AttributeError(module)
    if module not in _classes:
        _classes[module] = job_class(module)
    return _classes[module]
