"""``cryohet <command>``: every subcommand is built from a method description (cryohet/methods)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryohet import __version__, describe
from cryohet.errors import InputError, OutputError, RunAborted
from cryohet.methods import all_methods
from cryohet.methods.base import Method, Param


def _help(p: Param) -> str:
    """argparse help for ``p``: text, choices, default ('%' escaped: argparse %-formats help strings)."""
    text = p.help
    if p.choices:
        text += f" Choices: {', '.join(map(str, p.choices))}."
    if p.default is not None:
        shown = ("yes" if p.default else "no") if p.type is bool else p.default
        text += f" (default: {shown})"
    elif p.required:
        text += " (required)"
    return text.replace("%", "%%")


def add_method_parser(sub: argparse._SubParsersAction, method: Method) -> argparse.ArgumentParser:
    sp = sub.add_parser(method.name, help=method.title.replace("%", "%%"), description=method.help,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--o", required=True, metavar="DIR",
                    help="Output folder (created; outputs are listed in DIR/cryohet_run.json, the log in DIR/run.log). "
                         "One run at a time; a folder with an earlier run needs --overwrite yes or --resume yes.")
    for p in method.all_params():
        kwargs = dict(dest=p.name, default=None, help=_help(p))
        if p.type is bool:
            kwargs.update(nargs="?", const="yes", metavar="yes|no")
        else:
            kwargs.update(metavar=p.type.__name__.upper() if p.type is not str else "TEXT")
        sp.add_argument(p.flag, **kwargs)
    sp.set_defaults(_method=method)
    return sp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryohet",
        description="Continuous-heterogeneity analysis for cryo-EM. Lengths are in Å, angles in degrees, "
                    "voltages in kV, Cs in mm, unless a flag says otherwise.")
    parser.add_argument("--version", action="version", version=f"cryohet {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for method in all_methods().values():
        add_method_parser(sub, method)
    describe.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if args_in[:1] == ["describe"]:  # before the method parsers: --key imports no method
        return describe.main(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    method: Method | None = getattr(args, "_method", None)
    if method is None:
        parser.print_help()
        return 2
    values = {p.name: getattr(args, p.name) for p in method.all_params()}
    values = {k: v for k, v in values.items() if v is not None}
    from cryohet.runner import run_method  # torch: not for --help

    try:
        run_method(method, values, args.o, command=sys.argv if argv is None else ["cryohet", *argv])
    except (InputError, ValueError) as exc:
        print(f"cryohet {method.name}: error: {exc}", file=sys.stderr)
        return 2
    except RunAborted as exc:
        print(f"cryohet {method.name}: {exc}", file=sys.stderr)
        return 3
    except OutputError as exc:
        print(f"cryohet {method.name}: error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
