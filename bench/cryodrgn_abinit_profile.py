"""Where `cryodrgn abinit`'s time goes: runs it (its own environment's python) under cProfile for a fixed time and
prints the functions by cumulative and by own time.

    /path/to/cryodrgn-venv/bin/python bench/cryodrgn_abinit_profile.py 200 particles_noposes.star --ctf ctf.pkl \\
        --zdim 1 -n 1 --datadir DATA --max-threads 1 --num-workers 0 --no-analysis -o /tmp/run_prof

The first argument is the seconds to profile (SIGALRM ends the run there); the rest are `cryodrgn abinit`'s.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import signal
import sys
import time


class _Stop(Exception):
    pass


def _stop(*_: object) -> None:
    raise _Stop()


def main() -> None:
    from cryodrgn.commands import abinit

    seconds = int(sys.argv[1])
    parser = argparse.ArgumentParser()
    abinit.add_args(parser)
    args = parser.parse_args(sys.argv[2:])
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(seconds)
    prof, t0 = cProfile.Profile(), time.time()
    prof.enable()
    try:
        abinit.main(args)
    except _Stop:
        pass
    prof.disable()
    print(f"profiled {time.time() - t0:.0f} s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
