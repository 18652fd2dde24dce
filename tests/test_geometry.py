"""Geometry with RELION's conventions, checked against relion_project image by image."""
from __future__ import annotations

import numpy as np
import torch
from relion_tools import THIRDPARTY, pose_ctf_star, relion

from cryohet.geometry.ctf import CTFParams, ctf_2d
from cryohet.geometry.euler import euler_to_matrix, matrix_to_euler, random_euler
from cryohet.geometry.fourier import fft2c, fourier_crop_2d, fourier_crop_3d, ifft2c
from cryohet.geometry.project import Projector
from cryohet.geometry.shift import phase_shift_2d
from cryohet.io.mrc import read_map, write_map
from cryohet.io.star import read_star


def test_euler_round_trip_and_orthonormal():
    e = random_euler(500, np.random.default_rng(3))
    A = euler_to_matrix(e)
    assert np.allclose(A @ np.swapaxes(A, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(A), 1)
    assert np.allclose(euler_to_matrix(matrix_to_euler(A)), A, atol=1e-10)
    assert (matrix_to_euler(A)[:, 1] >= 0).all() and (matrix_to_euler(A)[:, 1] <= 180).all()
    # RELION's matrix for rot=90 (tilt=psi=0) maps x to -y: A = Rz(-90) in the usual convention
    assert np.allclose(euler_to_matrix(np.array([90.0, 0, 0])), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # degenerate tilt 0 and 180
    for tilt in (0.0, 180.0):
        A0 = euler_to_matrix(np.array([30.0, tilt, 40.0]))
        assert np.allclose(euler_to_matrix(matrix_to_euler(A0)), A0, atol=1e-10)


def test_integer_shift_is_a_roll_and_crop_keeps_values():
    img = torch.randn(2, 32, 32, dtype=torch.float64)
    out = ifft2c(phase_shift_2d(fft2c(img), torch.tensor([[3.0, -2.0], [0.0, 5.0]]))).real
    assert torch.allclose(out[0], torch.roll(img[0], shifts=(-2, 3), dims=(0, 1)), atol=1e-10)
    assert torch.allclose(out[1], torch.roll(img[1], shifts=(5, 0), dims=(0, 1)), atol=1e-10)
    const = torch.full((1, 32, 32), 2.5)
    assert torch.allclose(fourier_crop_2d(const, 16), torch.full((1, 16, 16), 2.5), atol=1e-5)
    assert torch.allclose(fourier_crop_3d(torch.full((16, 16, 16), 1.5), 8), torch.full((8, 8, 8), 1.5), atol=1e-5)


def test_projection_and_ctf_match_relion_project(tmp_path):
    """Noise-free relion_project --ctf images with origins, astigmatism, phase shift, B-factor and scale."""
    vol, _ = read_map(THIRDPARTY / "hand-vol.mrc")
    apix, box, n = 2.0, vol.shape[0], 24
    write_map(tmp_path / "vol.mrc", vol, apix)
    parts = pose_ctf_star(tmp_path / "ang.star", n, box, apix, seed=1, extra_ctf=True)
    relion("relion_project", "--i", "vol.mrc", "--o", "proj", "--ang", "ang.star", "--ctf", "--angpix", str(apix),
           cwd=tmp_path)
    ref, _ = read_map(tmp_path / "proj.mrcs", allow_noncubic=True)
    assert ref.shape == (n, box, box)
    ctf = CTFParams.broadcast(n, defocus_u_A=parts.rlnDefocusU, defocus_v_A=parts.rlnDefocusV,
                              defocus_angle_deg=parts.rlnDefocusAngle, voltage_kV=300, cs_mm=2.7, amp_contrast=0.1,
                              phase_shift_deg=parts.rlnPhaseShift, bfactor_A2=parts.rlnCtfBfactor,
                              scale=parts.rlnCtfScalefactor)
    A = torch.as_tensor(euler_to_matrix(parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))
    origin_px = torch.as_tensor(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / apix)
    ours = Projector(torch.as_tensor(vol)).project(A, origin_px, ctf_2d(ctf, box, apix)).numpy()
    corr = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)])
    assert corr.min() >= 0.99, corr
    scale = (ours * ref).sum() / (ours**2).sum()
    assert abs(scale - 1) < 0.02, scale
    # the STAR that relion_project wrote keeps our poses
    written = read_star(tmp_path / "proj.star")["particles"]
    assert np.allclose(written["rlnAngleTilt"], parts["rlnAngleTilt"], atol=1e-3)


def test_the_half_plane_and_its_mates_cover_the_resolution_circle_once() -> None:
    from cryohet.geometry.lattice import Lattice, crop_transforms

    lat = Lattice(16, 2.0)
    for dc in (False, True):
        pts = lat.half_plane(dc=dc)
        k = (pts.kxy * 16).round().long()
        full = {tuple(v) for v in k.tolist()} | {tuple(v) for v in (-k).tolist()}
        c = torch.arange(16) - 8
        ky, kx = torch.meshgrid(c, c, indexing="ij")
        inside = {(int(x), int(y)) for x, y in zip(kx.flatten(), ky.flatten()) if x * x + y * y < 64}
        assert full == (inside if dc else inside - {(0, 0)})
        assert len(full) == 2 * len(pts) - int(dc)        # no pixel is its own mate but the zero frequency
        assert float(pts.weight.sum()) == len(full)
    # cropping scales by (n/N)^3: a map's voxel values stay when its projections are cropped
    F = torch.ones((1, 16, 16), dtype=torch.complex64)
    assert torch.allclose(crop_transforms(F, 8), torch.full((1, 8, 8), 1 / 8, dtype=torch.complex64))
    assert lat.cropped(8).apix == 4.0
