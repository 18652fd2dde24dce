"""Consensus across methods: identical latents agree fully, unrelated ones do not."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cryohet.errors import InputError
from cryohet.methods import consensus as consensus_method
from cryohet.record import read_record
from cryohet.runner import run_method
from cryohet.validation.consensus import METRICS, consensus

os.environ.setdefault("CRYOHET_NO_PROGRESS", "1")


def _latents(n: int = 400, seed: int = 0) -> np.ndarray:
    """A curved 1-D motion embedded in 3-D (as a VAE might give), plus a little noise."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    return np.stack([t, 0.3 * t**2, 0.05 * rng.normal(size=n)], axis=1)


def test_identical_and_transformed_latents_agree() -> None:
    z = _latents()
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    res = consensus({"a": z, "same": z.copy(), "rotated": -2.0 * z @ rot.T + 1.0})
    for name in METRICS:
        m = np.asarray(res["matrices"][name])
        assert m.shape == (3, 3)
        np.testing.assert_allclose(m, 1.0, atol=1e-6, err_msg=name)


def test_shuffled_latents_disagree() -> None:
    z = _latents()
    shuffled = z[np.random.default_rng(2).permutation(len(z))]
    pair = consensus({"a": z, "shuffled": shuffled})["pairs"][0]
    assert pair["spearman_pc1"] < 0.15
    assert pair["cca_mean"] < 0.15
    assert pair["knn_overlap"] < 0.1  # chance k/N = 0.025


def test_consensus_command(tmp_path: Path) -> None:
    z = _latents()
    np.save(tmp_path / "a.npy", z)
    np.savetxt(tmp_path / "b.txt", z[:, :2] * 3)
    np.save(tmp_path / "c.npy", np.random.default_rng(3).normal(size=(400, 4)))
    out = tmp_path / "out"
    run_method(consensus_method.METHOD, {"inputs": ",".join(str(tmp_path / f) for f in ("a.npy", "b.txt", "c.npy")),
                                         "threads": 1}, out)
    rec = read_record(out)
    assert sorted(o.kind for o in rec.outputs) == ["plot", "report", "report"]
    res = json.loads((out / "consensus.json").read_text())
    assert res["labels"] == ["a", "b", "c"]
    m = np.asarray(res["matrices"]["spearman_pc1"])
    assert m[0, 1] > 0.99 and m[0, 2] < 0.2
    assert "| a | b |" in (out / "report.md").read_text()
    assert (out / "consensus.png").stat().st_size > 1000
    with pytest.raises(InputError, match="different numbers"):
        consensus({"a": z, "b": z[:100]})
