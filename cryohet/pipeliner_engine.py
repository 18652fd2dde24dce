"""The engine's side of a RELION 5 / CCP-EM pipeliner job (``cryohet/pipeliner_jobs.py`` makes the job types).

A job runs ``<python> -m cryohet.pipeliner_engine <method> --o <job dir> --<param> <value> ...``, one argument
list, from the project folder; ``<python>`` is ``CRYOHET_PYTHON`` (the engine's environment) or the pipeliner's
own, so this module imports nothing of the pipeliner. It runs the method as ``cryohet <method>`` does, with two
differences that make it a RELION job, as the External job does (``relion_external.py``): the log and progress
go to stdout, which the pipeliner appends to the job's ``run.out``, and stderr (``run.err``) has only the errors;
and the External job's defaults apply (image paths relative to the project folder, the job folder's earlier run
replaced). The pipeliner reads the outputs from the run record afterwards. Exit codes: 0 finished, 2 bad
parameters or input, 3 aborted (the pipeliner's abort sends SIGTERM), 1 any other failure.
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from cryohet.errors import InputError, OutputError, RunAborted
from cryohet.methods import all_methods, get_method
from cryohet.record import RECORD_NAME
from cryohet.relion_external import UsageError, method_values, parse_job_args

USAGE = ("usage: python -m cryohet.pipeliner_engine METHOD --o JOB_DIR [--PARAM VALUE]...\n"
         "Runs a cryohet method as a RELION 5 pipeliner job does (log on stdout, errors on stderr; "
         "see docs/hosts.md).")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(f"{USAGE}\nmethods: {', '.join(all_methods())}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    try:
        method = get_method(name)
        args = parse_job_args(["--method", method.name, *rest])
        if not args.out:
            raise UsageError("--o JOB_DIR is required")
        values = method_values(method, args)
    except KeyError as exc:
        print(f"cryohet: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except (UsageError, ValueError) as exc:
        print(f"cryohet {name}: error: {exc}", file=sys.stderr)
        return 2

    from cryohet.runner import run_method

    try:
        with contextlib.redirect_stderr(sys.stdout):  # the log and progress to run.out
            record = run_method(method, values, Path(args.out), command=["cryohet", *argv])
    except RunAborted as exc:
        print(f"cryohet {method.name}: {exc}", file=sys.stderr)
        return 3
    except (InputError, ValueError, OutputError) as exc:
        print(f"cryohet {method.name}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the reason and where, in run.err
        print(f"cryohet {method.name}: failed: {exc!r}\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    print(f"cryohet {method.name}: finished; {len(record.outputs)} outputs listed in "
          f"{Path(args.out) / RECORD_NAME}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
