"""The prepared-image cache and the batches prepared ahead (#17 items 4 and 1): cached float16 transforms equal the
preparer's, later epochs read no image, training with and without the cache agrees, the disk cache appears only
complete and is never reused stale, and the background reader changes nothing but the timing (same batches,
exact resume, no thread left behind when a step raises)."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from cryohet.data.image_cache import PREFIX, CachedPreparer, open_cache, planned_bytes
from cryohet.data.loader import Batch, BatchStream
from cryohet.data.prepare import ImagePreparer
from cryohet.geometry.lattice import Lattice
from cryohet.inference.fit_neural import fit_neural
from cryohet.inference.trainer import TrainOptions
from cryohet.io.particles import load_particles
from cryohet.io.reader import ImageReader
from cryohet.methods.simulate import METHOD as SIMULATE
from cryohet.models.neural import VolumeConfig
from cryohet.runner import run_method

N, BATCH = 400, 40  # whole batches: every particle is used in every epoch
INFERENCE = {"kind": "amortised", "enc_layers": 2, "enc_dim": 32}
LOG = logging.getLogger("test_prepared_cache")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 particles of the bundled molecule's hinge motion, box 32, SNR 1, origins σ 2 Å."""
    out = tmp_path_factory.mktemp("cache")
    run_method(SIMULATE, dict(box=32, apix=4.0, resolution_A=10.0, n_particles=N, snr=1.0, n_states=10, threads=1,
                              seed=7), out)
    return out


class Reads:
    """Counts the images read from the stacks (every ImageReader), per epoch, through the trainer's progress hook."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None):
        self.total, self.per_epoch, self.files = 0, {}, {}
        self.fail_after = fail_after
        original = ImageReader.read

        def read(reader: ImageReader, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            self.total += len(rows)
            return original(reader, rows, out)

        monkeypatch.setattr(ImageReader, "read", read)
        self.watch: Path | None = None

    def progress(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
        start = self.total
        for i, item in enumerate(items):
            if i == 1 and self.watch is not None:  # the cache folder while the first epoch runs
                self.files[desc] = sorted(p.name for p in self.watch.iterdir())
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("a step failed")
            yield item
        self.per_epoch[desc] = self.total - start

    @property
    def ctx(self) -> SimpleNamespace:
        return SimpleNamespace(log=LOG, progress=self.progress)


def _fit(pset: Any, out: Path, ctx: Any = None, box: int = 32, **opts: Any) -> Any:
    cfg = VolumeConfig(box=box, apix=pset.apix * pset.box / box, zdim=2, dec_layers=2, dec_dim=32, seed=0)
    topts = TrainOptions(**{"epochs": 3, "batch_size": BATCH, "lr": 1e-3, "amp": "no", **opts})
    _, res = fit_neural(pset, cfg, INFERENCE, topts, out, ctx=ctx, resume=(out / "checkpoint.safetensors").exists())
    return res


def test_cached_transforms_equal_the_preparers_within_float16(sim: Path, tmp_path: Path) -> None:
    pset = load_particles(str(sim / "particles.star"))
    lattice = Lattice(pset.box, pset.apix).cropped(24)
    prep = ImagePreparer(pset, lattice, lattice.half_plane(12), 0.85, scale=3.7)
    reader = pset.reader()
    rows = np.random.default_rng(0).permutation(N)[:64]
    exact = prep.transforms(torch.from_numpy(reader.read(rows)), rows)
    for mode in ("memory", "disk"):
        cache = open_cache(mode, reader, prep, tmp_path, None, LOG)
        assert cache is not None and cache.missing(rows).all()
        got = CachedPreparer(prep, cache)(Batch(rows, torch.from_numpy(reader.read(rows))))
        assert not cache.missing(rows).any() and cache.missing(np.setdiff1d(np.arange(N), rows)).all()
        err = (got.images_ft - exact).abs()
        assert float((err / exact.abs().clamp_min(1e-3)).max()) <= 1.01 * 2.0 ** -11  # float16's rounding
        assert got.images_ft.dtype == torch.complex64
        torch.testing.assert_close(got.ctf, prep.ctf(rows))
        again = CachedPreparer(prep, cache)(Batch(rows, torch.empty(0), read=np.zeros(len(rows), bool)))
        assert torch.equal(again.images_ft, got.images_ft)  # served without images
        bright = exact[:2] * 1e9  # an outlier far beyond float16's range keeps float16's relative precision
        cache.put(rows[:2], bright)
        assert float(((cache.get(rows[:2]) - bright).abs() / bright.abs().clamp_min(1e6)).max()) <= 1.01 * 2.0 ** -11
        cache.close(remove=True)
    assert planned_bytes(N, prep) == N * (len(prep.points) * 4 + 4)


def test_the_cache_leaves_the_runs_planned_memory_free(sim: Path, tmp_path: Path) -> None:
    """The memory the run's plan still needs is not the cache's: with more than the available memory reserved
    (twice what was free, as the free memory moves between looks), ``auto`` keeps the cache on disk and ``memory``
    refuses, naming the reservation; with none reserved it is in memory."""
    from cryohet.device import free_memory_bytes
    from cryohet.errors import InputError

    pset = load_particles(str(sim / "particles.star"))
    lattice = Lattice(pset.box, pset.apix)
    prep, reader = ImagePreparer(pset, lattice, lattice.half_plane(16), 0.85, scale=1.0), pset.reader()
    free = free_memory_bytes("cpu")
    cache = open_cache("auto", reader, prep, tmp_path, None, LOG)
    assert cache is not None and cache.where == "memory"
    cache.close(remove=True)
    cache = open_cache("auto", reader, prep, tmp_path, None, LOG, reserved_bytes=2 * free)
    assert cache is not None and cache.where.endswith(".f16")
    cache.close(remove=True)
    with pytest.raises(InputError, match=r"with the run's \d+\.\d+ GB planned.*enough for 0 particles"):
        open_cache("memory", reader, prep, tmp_path, None, LOG, reserved_bytes=2 * free)


def test_later_epochs_read_no_image_and_train_as_without_the_cache(sim: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pset = load_particles(str(sim / "particles.star"))
    reads = Reads(monkeypatch)
    cached = _fit(pset, tmp_path / "memory", reads.ctx, cache="memory")
    assert reads.per_epoch == {"epoch 1/3": N, "epoch 2/3": 0, "epoch 3/3": 0}
    plain = _fit(pset, tmp_path / "off", cache="off")
    disk = _fit(pset, tmp_path / "disk", cache="disk")
    for a, b in zip(cached.history, plain.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert [h["loss"] for h in disk.history] == [h["loss"] for h in cached.history]  # the same float16 values
    assert np.array_equal(disk.z_mu, cached.z_mu)
    for d in range(plain.z_mu.shape[1]):  # the latents too, up to the drift that rounding seeds in training
        assert np.corrcoef(cached.z_mu[:, d], plain.z_mu[:, d])[0, 1] > 0.995
    assert np.median(np.abs(cached.z_mu - plain.z_mu)) < 0.01 * np.abs(plain.z_mu).max()
    assert not list((tmp_path / "disk").glob(f"*{PREFIX}*"))  # a run-folder cache goes when the run ends well


def test_the_disk_cache_appears_complete_and_is_not_reused_stale(sim: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pset = load_particles(str(sim / "particles.star"))
    folder = tmp_path / "cache"
    reads = Reads(monkeypatch)
    reads.watch = folder
    _fit(pset, tmp_path / "a", reads.ctx, epochs=1, cache="disk", cache_dir=str(folder))
    during = reads.files["epoch 1/1"]
    assert len(during) == 1 and during[0].startswith(f".{PREFIX}") and ".part" in during[0]  # a temporary only
    done = sorted(folder.iterdir())
    assert len(done) == 1 and done[0].name.startswith(PREFIX) and done[0].suffix == ".f16"
    assert reads.per_epoch["epoch 1/1"] == N

    _fit(pset, tmp_path / "b", reads.ctx, epochs=1, cache="disk", cache_dir=str(folder))
    assert reads.per_epoch["epoch 1/1"] == 0  # the same particles and preparation: reused
    _fit(pset, tmp_path / "c", reads.ctx, box=24, epochs=1, cache="disk", cache_dir=str(folder))
    assert reads.per_epoch["epoch 1/1"] == N  # another crop
    moved = replace(pset, shift_A=pset.shift_A + 1.0)
    _fit(moved, tmp_path / "d", reads.ctx, epochs=1, cache="disk", cache_dir=str(folder))
    assert reads.per_epoch["epoch 1/1"] == N  # other origins
    assert len(list(folder.glob(f"{PREFIX}*.f16"))) == 3
    _fit(pset, tmp_path / "e", reads.ctx, epochs=1, cache="auto", cache_dir=str(folder))
    assert reads.per_epoch["epoch 1/1"] == 0  # auto takes a complete file of its own fingerprint


def test_the_background_reader_changes_nothing_and_resumes_exactly(sim: Path, tmp_path: Path) -> None:
    pset = load_particles(str(sim / "particles.star"))
    ahead = _fit(pset, tmp_path / "ahead", cache="memory", prefetch=4)
    inline = _fit(pset, tmp_path / "inline", cache="memory", prefetch=0)
    assert [h["loss"] for h in ahead.history] == [h["loss"] for h in inline.history]
    assert np.array_equal(ahead.z_mu, inline.z_mu)
    _fit(pset, tmp_path / "resumed", cache="memory", prefetch=4, epochs=2)
    resumed = _fit(pset, tmp_path / "resumed", cache="memory", prefetch=4)  # a fresh (empty) cache
    assert resumed.start_epoch == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in ahead.history]
    assert np.array_equal(resumed.z_mu, ahead.z_mu)


def test_a_failing_step_leaves_no_reader_thread(sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pset = load_particles(str(sim / "particles.star"))
    reads = Reads(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="a step failed") as failed:
        _fit(pset, tmp_path / "run", reads.ctx, cache="disk", prefetch=2, chunk_images=40)
    assert failed.value.__traceback__ is not None  # the failed frames are still referenced
    assert not [t for t in threading.enumerate() if t.name == "cryohet-loader"]
    assert not list((tmp_path / "run").glob(f"*{PREFIX}*"))  # the unfinished cache file is gone


def test_the_stream_reads_only_the_rows_asked_for(sim: Path) -> None:
    pset = load_particles(str(sim / "particles.star"))
    reader = pset.reader()
    batches = [np.arange(i, i + 10) for i in range(0, 40, 10)]
    full = list(BatchStream(reader, batches, prefetch=2, chunk_images=20))
    cached = np.zeros(N, bool)
    cached[::3] = True
    part = list(BatchStream(reader, batches, prefetch=0, chunk_images=20, needs_read=lambda r: ~cached[r]))
    for f, p, rows in zip(full, part, batches, strict=True):
        assert np.array_equal(p.rows, rows) and np.array_equal(p.read, ~cached[rows])
        assert torch.equal(p.images, f.images[torch.from_numpy(~cached[rows])])
