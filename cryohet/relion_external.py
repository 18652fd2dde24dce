"""RELION External job: run any cryohet method inside a RELION project (3.1, 4 and 5).

RELION starts the executable from the project folder as
``cryohet_external --o External/jobNNN/ [--in_parts F] [--in_3dref F] [--in_mask F]
[--<label> <value>]... --j N [other arguments]`` with stdout and stderr appended to the job's
``run.out`` and ``run.err``. The method is one of the label/value pairs (``--method reconstruct``);
the others are the method's parameters, exactly as for ``cryohet <method>``. The method runs in this
process; its outputs are announced to RELION in ``RELION_OUTPUT_NODES.star`` (built from the run
record) before ``RELION_JOB_EXIT_SUCCESS`` is written. Failures write ``RELION_JOB_EXIT_FAILURE``
with the reason in ``run.err``; ``RELION_JOB_ABORT_NOW`` in the job folder stops the run and
writes ``RELION_JOB_EXIT_ABORTED``.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryohet import __version__
from cryohet.atomic import atomic_path
from cryohet.errors import InputError, RunAborted
from cryohet.methods import all_methods, get_method
from cryohet.methods.base import INPUT_ROLES, Method, Param
from cryohet.record import RunRecord

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

#: RELION's input flags -> cryohet input role.
ROLE_OF_FLAG = {flag: role for role, flag in INPUT_ROLES.items()}
#: Input flags RELION may pass that no cryohet method uses.
UNUSED_INPUT_FLAGS = ("in_movies", "in_mics", "in_coords")
#: Options of the job itself (not method parameters).
JOB_FLAGS = ("o", "method", "j", "pipeline_control", *ROLE_OF_FLAG, *UNUSED_INPUT_FLAGS)

#: Output kind -> (RELION 3.1 node type or None where 3.1 has none, RELION 4/5 node type label).
NODE_TYPES: dict[str, tuple[int | None, str]] = {
    "particles_star": (3, "ParticleGroupMetadata.star.relion"),
    "volume": (6, "DensityMap.mrc"),
    "volume_series": (6, "DensityMap.mrc"),
    "half_map": (10, "DensityMap.mrc.halfmap"),
    "mask": (7, "Mask3D.mrc"),
    "local_resolution": (12, "Image3D.mrc.localresmap"),  # RELION's local-resolution maps (3.1: a resmap node)
    # RELION 3.1 has no node type for atomic models: they are nodes of RELION 4/5 (the pipeliner jobs) only;
    # "{ext}" is the file's own (pdb or cif)
    "atomic_model": (None, "AtomCoords.{ext}"),
}
#: PDF files of these kinds become log-file nodes.
PDF_KINDS = ("plot", "report")
PDF_NODE = (13, "LogFile.pdf")

#: Defaults that differ under RELION: image paths relative to the project folder, RELION's convention; and
#: the job folder belongs to its job, so running a job again (RELION's continue or overwrite) replaces the
#: earlier run in it (``overwrite = no`` refuses; ``resume = yes`` continues where the method can).
RELION_DEFAULTS = {"image_paths": "cwd", "overwrite": "yes"}

#: The python of the environment the engine runs in, when not this one (the Scipion plugin's variable too).
ENGINE_PYTHON = "CRYOHET_PYTHON"
#: Set in the engine's environment after the switch, so that it happens once.
_IN_ENGINE_ENV = "CRYOHET_IN_ENGINE_ENV"

#: RELION's External job tab has ten label/value pairs; ``method`` takes one.
RELION_PARAM_SLOTS = 10


class UsageError(Exception):
    """The command line cannot be understood."""


@dataclass
class JobArgs:
    out: str | None = None
    method: str | None = None
    threads: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # input role -> path
    values: dict[str, str] = field(default_factory=dict)  # method parameter -> text


def _split_flag(token: str) -> tuple[str, str | None] | None:
    """``--name`` -> (name, None); ``--name=value`` -> (name, value); else None."""
    if not token.startswith("--") or len(token) < 3:
        return None
    name, eq, value = token[2:].partition("=")
    return name, (value if eq else None)


def parse_job_args(argv: Sequence[str]) -> JobArgs:
    """Parse what RELION passes.

    A value runs up to the next ``--name`` token, so values that RELION pasted unquoted with
    spaces in them stay whole (and negative numbers, with one dash, are values). Unknown options
    are errors.
    """
    argv = list(argv)
    method_name = None
    for i, tok in enumerate(argv):
        split = _split_flag(tok)
        if split and split[0] == "method":
            method_name = split[1] if split[1] is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    method = None
    if method_name:
        try:
            method = get_method(method_name)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
    param_names = {p.name for p in method.all_params()} if method else set()
    known = set(JOB_FLAGS) | param_names

    def is_option(tok: str) -> bool:
        return tok.startswith("--") and tok[2:3].isalpha()

    args = JobArgs()
    i = 0
    while i < len(argv):
        split = _split_flag(argv[i])
        if split is None:
            raise UsageError(f"unexpected argument {argv[i]!r} (expected --option value)")
        name, value = split
        i += 1
        if value is None:
            words = []
            while i < len(argv) and not is_option(argv[i]):
                words.append(argv[i])
                i += 1
            value = " ".join(words)
        if name not in known:
            if method is None:
                raise UsageError(f"unknown option --{name}; give the method first: --method "
                                 f"{{{','.join(all_methods())}}}")
            raise UsageError(f"unknown option --{name} for method {method.name}; its parameters: "
                             + ", ".join(sorted(param_names)))
        if name == "o":
            args.out = value
        elif name == "method":
            args.method = value
        elif name == "j":
            args.threads = value
        elif name in ROLE_OF_FLAG:
            if value:
                args.inputs[ROLE_OF_FLAG[name]] = value
        elif name in UNUSED_INPUT_FLAGS:
            if value:
                raise UsageError(f"--{name}: cryohet methods take particles, a 3D reference or a mask, "
                                 f"not {name[3:]}")
        elif name == "pipeline_control":
            pass
        else:
            args.values[name] = value
    return args


def method_values(method: Method, args: JobArgs) -> dict[str, str]:
    """The method's parameter values: label/value pairs, RELION inputs mapped by role, ``--j``."""
    values: dict[str, str] = {}
    for name, text in args.values.items():
        p = method.param(name)
        if text == "" and p.type is bool:
            text = "yes"  # ``--flag`` alone, as on the command line
        if text != "":
            values[name] = text
    for role, path in args.inputs.items():
        targets = [p for p in method.params if p.input_role == role]
        if not targets:
            raise UsageError(f"method {method.name} takes no {role} input (--{INPUT_ROLES[role]})")
        values.setdefault(targets[0].name, path)
    if args.threads and "threads" not in values:
        values["threads"] = args.threads
    names = {p.name for p in method.all_params()}
    for name, value in RELION_DEFAULTS.items():
        if name in names:
            values.setdefault(name, value)
    return values


def _node_name(job_dir: str, rel_path: str) -> str:
    """The node's path as RELION names it: relative to the project folder (the working folder)."""
    path = posixpath.normpath(posixpath.join(Path(job_dir).as_posix(), rel_path))
    if posixpath.isabs(path):
        with contextlib.suppress(ValueError):
            path = Path(path).relative_to(Path.cwd()).as_posix()
    return path


def output_nodes(record: RunRecord, job_dir: str) -> list[tuple[str, int | None, str]]:
    """(node name, RELION 3.1 type or None, RELION 4/5 type label) for each output RELION can use."""
    nodes = []
    for out in record.outputs:
        node = NODE_TYPES.get(out.kind)
        if node is None and out.kind in PDF_KINDS and out.path.lower().endswith(".pdf"):
            node = PDF_NODE
        if node is not None:
            ext = "cif" if out.path.lower().endswith((".cif", ".mmcif")) else "pdb"
            nodes.append((_node_name(job_dir, out.path), node[0], node[1].format(ext=ext)))
    return nodes


def write_output_nodes(path: Path, nodes: list[tuple[str, int | None, str]]) -> None:
    """Write ``RELION_OUTPUT_NODES.star`` (read by RELION 3.1 for the type, 4/5 for the label); nodes without a
    RELION 3.1 type are left out (3.1 reads every line's type)."""
    lines = ["# version 30001", "", "data_output_nodes", "", "loop_",
             "_rlnPipeLineNodeName #1", "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    lines += [f"{name} {ntype} {label}" for name, ntype, label in nodes if ntype is not None]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n\n")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _report_error(job_dir: Path, text: str) -> None:
    """Put ``text`` in ``run.err``: through stderr when RELION already sends it there, else appended."""
    print(text, file=sys.stderr, flush=True)
    run_err = job_dir / "run.err"
    try:
        same = run_err.exists() and os.path.samestat(os.fstat(sys.stderr.fileno()), run_err.stat())
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        with open(run_err, "a") as fh:
            fh.write(text + "\n")


def _param_line(p: Param) -> str:
    kind = "choice" if p.choices else p.type.__name__.lower()
    bits = [kind]
    if p.choices:
        bits.append("one of " + "|".join(map(str, p.choices)))
    if p.min is not None:
        bits.append(f">= {p.min:g}")
    if p.max is not None:
        bits.append(f"<= {p.max:g}")
    if p.required and p.default is None:
        bits.append("required")
    if p.expert:
        bits.append("expert")
    return f"({', '.join(bits)}) {p.help}"


def list_params(method: Method) -> str:
    """The External job tab to fill for ``method``: inputs, then label/value pairs (defaults shown)."""
    exe = Path(sys.argv[0]).name if Path(sys.argv[0]).name.startswith("cryohet") else "cryohet_external"
    lines = [f"cryohet {method.name}: {method.title}", "",
             "RELION External job, Input tab:",
             f"  External executable:  {exe}   (full path, or on PATH; its python must have cryohet installed)"]
    flag_labels = {"in_parts": "Input particles", "in_3dref": "Input 3D reference", "in_mask": "Input 3D mask"}
    for p in method.params:
        if p.input_role in INPUT_ROLES:
            need = "required" if p.required else "optional"
            lines.append(f"  {flag_labels[INPUT_ROLES[p.input_role]] + ':':22s}{need}; becomes --{p.name} "
                         f"({p.help})")
    lines += ["", "Params tab (label = value; list only what you change, the defaults are shown):",
              f"  {'Param1':8s} {'method':18s} = {method.name}"]
    slot = 2
    rest = []
    ordered = [p for p in method.all_params() if p.input_role not in INPUT_ROLES and p.name != "threads"]
    ordered.sort(key=lambda p: p.expert)
    for p in ordered:
        value = RELION_DEFAULTS.get(p.name, p.default)
        default = "" if value is None else ("yes" if value is True else "no" if value is False else str(value))
        if slot <= RELION_PARAM_SLOTS:
            lines.append(f"  {'Param' + str(slot):8s} {p.name:18s} = {default:10s} {_param_line(p)}")
            slot += 1
        else:
            rest.append(f"  {'--' + p.name + ' ' + default:30s} {_param_line(p)}")
    if rest:
        lines += ["", "More parameters go in 'Additional arguments' (Running tab) as --name value:"] + rest
    lines += ["", "Running tab: 'Number of threads' becomes --threads. GPUs: add the pair device = cuda "
              "(or cuda:N), and choose the card with CUDA_VISIBLE_DEVICES in the environment."]
    return "\n".join(lines)


def _usage() -> str:
    return ("usage: cryohet_external --o JOB_DIR --method METHOD [--in_parts STAR] [--in_3dref MRC] "
            "[--in_mask MRC] [--PARAM VALUE]... [--j THREADS]\n"
            "       cryohet_external --list-params [METHOD]\n"
            f"methods: {', '.join(all_methods())}\n"
            "Runs a cryohet method as a RELION External job (see docs/hosts.md).")


def run_job(args: JobArgs) -> int:
    """Run the job described by ``args`` in its folder; return the exit code."""
    job_dir = Path(args.out)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        (job_dir / name).unlink(missing_ok=True)

    from cryohet.runner import ABORT_ENV, run_method

    previous_abort = os.environ.get(ABORT_ENV)
    os.environ[ABORT_ENV] = str((job_dir / ABORT_NOW).resolve())
    try:
        if not args.method:
            raise UsageError("no method given: add the label/value pair method = "
                             f"{{{','.join(all_methods())}}} in the External job's Params tab")
        try:
            method = get_method(args.method)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        values = method_values(method, args)
        print(f"cryohet {__version__} External job: {method.name} in {job_dir}", flush=True)
        with contextlib.redirect_stderr(sys.stdout):  # log and progress to run.out; run.err keeps errors
            record = run_method(method, values, job_dir.resolve())
        write_output_nodes(job_dir / OUTPUT_NODES, output_nodes(record, args.out))
    except RunAborted as exc:
        _report_error(job_dir, f"cryohet: {exc}")
        _touch(job_dir / EXIT_ABORTED)
        return 3
    except (UsageError, InputError, ValueError) as exc:
        _report_error(job_dir, f"cryohet {args.method or ''}: error: {exc}")
        _touch(job_dir / EXIT_FAILURE)
        return 2
    except BaseException as exc:  # noqa: BLE001 - RELION must always get an exit file
        _report_error(job_dir, f"cryohet {args.method or ''}: failed: {exc!r}\n{traceback.format_exc()}")
        _touch(job_dir / EXIT_FAILURE)
        return 1
    finally:
        if previous_abort is None:
            os.environ.pop(ABORT_ENV, None)
        else:
            os.environ[ABORT_ENV] = previous_abort
    _touch(job_dir / EXIT_SUCCESS)
    print(f"cryohet {method.name}: finished; {len(record.outputs)} outputs listed in {job_dir / OUTPUT_NODES}",
          flush=True)
    return 0


def _fail_before_job(argv: Sequence[str], reason: str, usage: bool = False) -> int:
    """Report a failure before the job could start: in the job folder when ``--o`` names one, else on stderr."""
    out = next((argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--o"), None)
    if out is None:
        print(f"{reason}\n{_usage()}" if usage else reason, file=sys.stderr)
        return 2
    Path(out).mkdir(parents=True, exist_ok=True)
    _report_error(Path(out), reason)
    _touch(Path(out) / EXIT_FAILURE)
    return 2


def engine_python() -> str | None:
    """The interpreter named by ``CRYOHET_PYTHON`` when it is another one than this (None: run here)."""
    python = os.environ.get(ENGINE_PYTHON, "").strip()
    if not python or os.environ.get(_IN_ENGINE_ENV) or os.path.abspath(python) == os.path.abspath(sys.executable):
        return None
    return python


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    python = engine_python()
    if python:  # the whole job, --version and --list-params too, runs in the engine's environment
        try:
            os.execve(python, [python, "-m", "cryohet.relion_external", *argv], {**os.environ, _IN_ENGINE_ENV: "1"})
        except OSError as exc:
            return _fail_before_job(argv, f"cryohet_external: {ENGINE_PYTHON}={python} cannot run: {exc.strerror}")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"cryohet {__version__}")
        return 0
    if argv[0] in ("--list-params", "--list_params"):
        names = argv[1:] or list(all_methods())
        try:
            print("\n\n".join(list_params(get_method(n)) for n in names))
        except KeyError as exc:
            print(f"cryohet_external: {exc.args[0]}", file=sys.stderr)
            return 2
        return 0
    try:
        args = parse_job_args(argv)
    except UsageError as exc:
        return _fail_before_job(argv, f"cryohet_external: error: {exc}", usage=True)
    if not args.out:
        print(f"cryohet_external: error: --o JOB_DIR is required\n{_usage()}", file=sys.stderr)
        return 2
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
