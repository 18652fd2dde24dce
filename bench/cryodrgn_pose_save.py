"""Run a cryoDRGN 4.3.1 command with ``PoseTracker.save`` fixed (run with cryoDRGN's Python, not cryohet's).

    PYTHONPATH=<cryoDRGN's site-packages> python bench/cryodrgn_pose_save.py train_vae ... --do-pose-sgd

cryoDRGN 4.3.1 saves the poses after every epoch of pose SGD with ``t = self.trans_emb.weight.data.cpu().numpy();
t /= self.D``: on the CPU ``.cpu()`` is the live tensor and ``.numpy()`` shares its memory, so every save divides the
translation table it trains by D (box + 1) and the origins shrink to zero within two epochs (on a GPU ``.cpu()``
copies). This runner saves as cryoDRGN does and then puts the table back; the command, its arguments and everything
else are cryoDRGN's (``bench_refine_poses.py --cryodrgn_patched``: an executable that runs this file).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import cryodrgn.pose as pose

_save = pose.PoseTracker.save


def save(self: pose.PoseTracker, out_pkl: str) -> None:
    emb = getattr(self, "trans_emb", None)
    kept = emb.weight.data.clone() if emb is not None else None
    kept_t = self.trans.clone() if getattr(self, "trans", None) is not None else None
    _save(self, out_pkl)
    if kept is not None:
        emb.weight.data.copy_(kept)
    if kept_t is not None:
        self.trans.copy_(kept_t)


if __name__ == "__main__":
    pose.PoseTracker.save = save
    cmd = sys.argv[1]
    mod = importlib.import_module(f"cryodrgn.commands.{cmd}")
    parser = argparse.ArgumentParser(prog=f"cryodrgn {cmd}")
    mod.add_args(parser)
    sys.exit(mod.main(parser.parse_args(sys.argv[2:])))
