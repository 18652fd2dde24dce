"""Memory plans of train-vae and principal-volumes (#17 item 3): the VAE's plan counts its parameters exactly and
bounds the activations autograd keeps for a step (within a factor 2); settings that cannot fit are refused before
anything is allocated, naming the particles and the largest setting that fits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from relion_tools import noise_stack_star

from cryohet.cli import main
from cryohet.device import free_memory_bytes
from cryohet.geometry.lattice import Lattice
from cryohet.inference.amortised import AmortisedInference
from cryohet.inference.memory_plans import MEMORY_FRACTION, PvShape, VaeShape
from cryohet.models.neural import VolumeConfig

APIX = 2.0


@pytest.mark.parametrize("box,dim,layers,batch,domain", [(32, 64, 2, 16, "fourier"), (48, 128, 3, 8, "hartley")])
def test_vae_plan_bounds_what_a_step_keeps(box: int, dim: int, layers: int, batch: int, domain: str) -> None:
    """Parameters, gradients and Adam's moments (16 bytes a parameter) plus every tensor autograd saves for the
    backward pass of one step: the plan is above that and below twice it."""
    cfg = VolumeConfig(box=box, apix=APIX, zdim=4, dec_layers=layers, dec_dim=dim, domain=domain, seed=0)
    points = Lattice(box, APIX).half_plane(cfg.max_freq * box)
    objective = AmortisedInference(cfg, points, {"enc_layers": layers, "enc_dim": dim})
    m, g = len(points), torch.Generator().manual_seed(0)
    data = {"y": torch.randn(batch, m, 2, generator=g), "ctf": torch.randn(batch, m, generator=g),
            "rot": torch.linalg.qr(torch.randn(batch, 3, 3, generator=g))[0],
            "enc": torch.randn(batch, 2 * m, generator=g), "rows": torch.arange(batch)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gen, reg = objective(data, torch.randn(batch, 4, generator=g))
    (gen + reg).backward()
    shape = VaeShape(m, 6 * cfg.pe_dim, dim, layers, 4, dim, layers, domain == "hartley")
    assert shape.n_params() == sum(p.numel() for p in objective.parameters())
    measured = sum(saved.values()) + 16 * shape.n_params()
    assert measured < shape.step_bytes(batch) < 2 * measured


def test_train_vae_refuses_a_batch_that_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A batch of 1024 images of box 128 with 4096-wide networks (about 660 GB) is refused before anything is
    allocated: exit 2, the STAR named, the largest batch size that fits named (it fits, one more does not), no
    checkpoint or model written."""
    star = noise_stack_star(tmp_path, 1024, 128, APIX, sparse=True)
    out = tmp_path / "out"
    assert main(["train-vae", "--particles", str(star), "--o", str(out), "--batch_size", "1024",
                 "--enc_dim", "4096", "--dec_dim", "4096", "--device", "cpu", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert str(star) in err and "GB free" in err and "--batch_size" in err
    assert not any(out.glob("*.safetensors")) and json.loads((out / "cryohet_run.json").read_text())["status"] == \
        "failed"
    named = int(err.split("enough for --batch_size ")[1].split(":")[0])
    points = len(Lattice(128, APIX).half_plane(64))
    shape = VaeShape(points, 6 * 64, 4096, 3, 8, 4096, 3)
    usable = MEMORY_FRACTION * free_memory_bytes("cpu") - 2 * 1024 * 128 ** 2 * 4
    assert 0 < named < 1024
    assert shape.step_bytes(named) <= 1.05 * usable and 0.95 * usable < shape.step_bytes(named + 1)


def test_principal_volumes_refuses_components_that_cannot_fit(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """50 components at a working box of 128 (hundreds of GB) are refused before anything is allocated, with the
    most components that fit at that box."""
    star = noise_stack_star(tmp_path, 20 * 51, 128, APIX, sparse=True)
    out = tmp_path / "out"
    assert main(["principal-volumes", "--particles", str(star), "--o", str(out), "--n_components", "50",
                 "--resolution_A", "0", "--device", "cpu", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert str(star) in err and "50 components at a working box of 128" in err
    assert not any(out.glob("*.mrc")) and json.loads((out / "cryohet_run.json").read_text())["status"] == "failed"
    named = int(err.split("enough for --n_components ")[1].split(":")[0])
    usable = MEMORY_FRACTION * free_memory_bytes("cpu")
    shape = PvShape(128, 2, named, 63, 256, 20 * 51, 1024.0)
    assert 0 < named < 50
    assert shape.bytes() <= 1.05 * usable and 0.95 * usable < PvShape(128, 2, named + 1, 63, 256, 20 * 51,
                                                                       1024.0).bytes()


def test_moments_names_the_batch_size_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A basis that fits with batches too large for the memory (the batch term, 48 × batch × pixels × basis bytes,
    dominates) is refused naming the largest --batch_size that fits at that basis (it fits, one more does not),
    not a basis size that ignores the batch."""
    from cryohet.inference.moments import moments_bytes, plan

    star = noise_stack_star(tmp_path, 60, 128, APIX, sparse=True)
    out = tmp_path / "out"
    args = ["--resolution_A", "12", "--diameter_A", "120"]
    assert main(["moments", "--particles", str(star), "--o", str(out), *args, "--batch_size", "100000000",
                 "--device", "cpu", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert str(star) in err and "GB free" in err
    assert not any(out.glob("*.mrc")) and json.loads((out / "cryohet_run.json").read_text())["status"] == "failed"
    named = int(err.split("enough for --batch_size ")[1].split(":")[0])
    lattice, radius_px, _, d = plan(60, 128, APIX, 12.0, 120.0, 3, 1, torch.device("cpu"), star)
    p = len(lattice.half_plane(radius_px, dc=True, strict=False))
    usable = MEMORY_FRACTION * free_memory_bytes("cpu")
    assert 1 < named < 100000000 and 1000 < d <= 6000
    assert moments_bytes(d, p, named) <= 1.05 * usable and 0.95 * usable < moments_bytes(d, p, named + 1)
