"""Pose hypotheses scored against one reference map in Fourier space, and a local search around given poses.

:class:`PoseScorer` gives the Gaussian log-likelihood of (rotation, shift) hypotheses for particle transforms,

    log p(X | R, s) = −Σ_k |X_k(s) − CTF_k · P_R,k|² / σ²_k      (the constant dropped),

over the half-plane pixels (:meth:`~cryohet.geometry.lattice.Lattice.half_plane`: each independent Fourier
coefficient of a real image once, the zero frequency left out: it does not depend on the pose) inside the
resolution circle. P_R is the central slice of the map for the RELION matrix R (``Projector.slice``) and
X(s) = ``undo_origin(X, s)``: the images moved back by a further origin s (RELION's sign). It is expanded as
|X|² − 2 Re(X(s)* CTF P_R) + CTF² |P_R|², so a shift costs one phase ramp per (image, shift), not a new slice,
and the cross term of all rotations and shifts of an image is one complex matrix product.

:func:`local_search` refines poses by a shrinking grid. The small rotations multiply the RELION matrix on the
left, A' = ΔR · A: since image = A · map coordinates, ΔR turns the *image frame* (its z component is an in-plane
rotation, x and y tilt the projection direction), so the grid has the same effect on the projection whatever
the current pose, and the geodesic distance moved is the angle of ΔR.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import torch

from cryohet.geometry.lattice import Lattice
from cryohet.geometry.project import Projector


def rotation_from_vector(rv: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (..., 3) (unit axis × angle in radians, right-hand rule) -> rotation matrices (..., 3, 3)."""
    x, y, z = rv.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([torch.stack([zero, -z, y], -1),
                        torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], -2)
    return torch.linalg.matrix_exp(skew)


def angle_between_deg(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (...,) in degrees between rotations A and B (..., 3, 3): the angle of Aᵀ B."""
    D = A.transpose(-1, -2) @ B
    cos = (D.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    sin = torch.stack([D[..., 2, 1] - D[..., 1, 2], D[..., 0, 2] - D[..., 2, 0],
                       D[..., 1, 0] - D[..., 0, 1]], -1).norm(dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


class PoseScorer:
    """Scores (rotation, shift) hypotheses of particle transforms against one reference map, in Fourier space.

    ``volume`` (n, n, n): the map on ``lattice`` (``lattice.box == n``), on the device to compute on, on the
    intensity scale of the images. ``resolution_A``: only frequencies below 1/resolution_A count (0: Nyquist).
    ``noise_var``: noise variance σ² per Fourier shell (length n // 2 + 1, shell = rounded radius in pixels) of
    the transforms as given (``fft2c``, unnormalised: white real-space noise of variance v gives n² v); None: 1
    everywhere. ``chunk``: most slices (images × rotations) computed at once, the memory bound on a GPU.

    Slices are sampled at the scored pixels only (``Projector.slice_points``), so a lower ``resolution_A`` costs
    less; the images are still prepared whole, so a Fourier-cropped lattice (``box_for_resolution``, as
    ``ImagePreparer`` does) with the map cropped alike saves their preparation too.
    """

    def __init__(self, volume: torch.Tensor, lattice: Lattice, resolution_A: float = 0.0,
                 noise_var: torch.Tensor | None = None, chunk: int = 4096, fit_scale: bool = False):
        n = lattice.box
        if tuple(volume.shape) != (n, n, n):
            raise ValueError(f"the map is {tuple(volume.shape)} but the lattice box is {n}")
        if resolution_A < 0 or chunk < 1:
            raise ValueError(f"resolution_A must be >= 0 and chunk >= 1, got {resolution_A} and {chunk}")
        self.lattice = lattice
        self.chunk = int(chunk)
        self.projector = Projector(volume)
        device = self.projector.device
        if noise_var is None:
            self.noise_var = torch.ones(n // 2 + 1, device=device)
        else:
            nv = torch.as_tensor(noise_var, dtype=torch.float32, device=device).reshape(-1)
            if len(nv) != n // 2 + 1 or not bool((nv > 0).all()):
                raise ValueError(f"noise_var must hold {n // 2 + 1} positive shell variances, got {tuple(nv.shape)}")
            self.noise_var = nv
        #: score each hypothesis at its best image scale α ≥ 0 (−|X − α CTF P|²/σ² maximised over α): a
        #: reference of the wrong amplitude then does not favour the views whose projections carry least power,
        #: which draws an ab initio map into a streak along one direction
        self.fit_scale = bool(fit_scale)
        self._keep(resolution_A)

    def _keep(self, resolution_A: float) -> None:
        """Score the half-plane pixels below 1 / resolution_A (0: Nyquist)."""
        n, device = self.lattice.box, self.projector.device
        radius_px = n / 2 if resolution_A == 0 else min(n / 2, n * self.lattice.apix / resolution_A)
        self.points = self.lattice.half_plane(radius_px)
        self.resolution_A = float(resolution_A)
        self._flat = self.points.flat.to(device)
        self._kxy = self.points.kxy.to(device)
        self._shell = self.points.shell.to(device)
        #: (M,) weight 1 / σ² of each pixel kept (0 where σ² is infinite): σ² = E|N_k|², so each half-plane
        #: coefficient is a complex Gaussian (as the classification EM and RELION's likelihood count it)
        self.weights = 1.0 / self.noise_var[self._shell]

    def limited(self, resolution_A: float) -> PoseScorer:
        """The same map and noise scored only below 1 / resolution_A (frequency marching): shares the map's
        transform, so a search can score coarse levels cheaply and finer ones on the same projector."""
        other = copy.copy(self)
        other._keep(resolution_A)
        return other

    @property
    def device(self) -> torch.device:
        return self.projector.device

    def take(self, grids: torch.Tensor) -> torch.Tensor:
        """Values (B, M) at the scored pixels of centred grids (B, n, n), on the scorer's device."""
        return grids.to(self.device).reshape(grids.shape[0], -1)[:, self._flat]

    def slices(self, rotations: torch.Tensor) -> torch.Tensor:
        """Central slices (R, M) of the map at the scored pixels for RELION matrices (R, 3, 3)."""
        return self.projector.slice_points(rotations, self._kxy)

    def score(self, images_ft: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
              shifts_px: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods (B, H, S) of rotations (B, H, 3, 3) × further origins ``shifts_px`` (B, S, 2) in pixels.

        ``images_ft`` (B, n, n): centred transforms with their origins undone (as ``ImageBatch.images_ft``);
        ``ctf`` (B, n, n). Hypothesis (h, s) compares ``undo_origin(images_ft, s)`` with ``ctf · slice(R_h)``.
        """
        n = self.lattice.box
        if images_ft.shape[-2:] != (n, n) or ctf.shape != images_ft.shape:
            raise ValueError(f"images and CTF must be (B, {n}, {n}), got {tuple(images_ft.shape)} and "
                             f"{tuple(ctf.shape)}")
        return self.score_points(self.take(images_ft), self.take(ctf), rotations, shifts_px)

    def score_points(self, x: torch.Tensor, c: torch.Tensor, rotations: torch.Tensor,
                     shifts_px: torch.Tensor) -> torch.Tensor:
        """:meth:`score` of transforms ``x`` and CTF ``c`` already taken at the scored pixels (B, M)."""
        B, M = x.shape
        if rotations.shape[0] != B or rotations.shape[-2:] != (3, 3) or rotations.ndim != 4:
            raise ValueError(f"rotations must be ({B}, H, 3, 3), got {tuple(rotations.shape)}")
        if shifts_px.shape[0] != B or shifts_px.ndim != 3 or shifts_px.shape[-1] != 2:
            raise ValueError(f"shifts_px must be ({B}, S, 2), got {tuple(shifts_px.shape)}")
        x = x.to(self.device, torch.complex64)
        c = c.to(self.device, torch.float32)
        w = self.weights
        H = rotations.shape[1]
        shift = shifts_px.to(self.device, torch.float32)
        # y: conj of the shifted images times CTF and weight; the cross term is 2 Re(P · y)
        y = torch.conj(x[:, None, :] * self._ramp(shift)) * (c * w)[:, None, :]
        xx = ((x.real ** 2 + x.imag ** 2) * w).sum(-1)  # (B,)
        cw = c * c * w  # (B, M)
        out = torch.empty(B, H, shift.shape[1], device=self.device)
        h_step = min(H, self.chunk)
        b_step = max(1, self.chunk // h_step)
        for b0 in range(0, B, b_step):
            b1 = min(B, b0 + b_step)
            for h0 in range(0, H, h_step):
                h1 = min(H, h0 + h_step)
                A = rotations[b0:b1, h0:h1].reshape(-1, 3, 3)
                P = self.slices(A).reshape(b1 - b0, h1 - h0, M)
                cross = torch.bmm(P, y[b0:b1].transpose(1, 2)).real  # (b, h, S)
                pp = ((P.real ** 2 + P.imag ** 2) * cw[b0:b1, None, :]).sum(-1)  # (b, h)
                out[b0:b1, h0:h1] = self._combine(cross, pp[..., None], xx[b0:b1, None, None])
        return out

    def _ramp(self, shifts_px: torch.Tensor) -> torch.Tensor:
        """undo_origin's phase ramps (..., M) at the scored pixels for further origins ``shifts_px`` (..., 2)."""
        phase = -2 * math.pi * shifts_px.to(self.device, torch.float32) @ self._kxy.T
        return torch.polar(torch.ones_like(phase), phase)

    def _combine(self, cross: torch.Tensor, pp: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        """−|X − α CTF P|²/σ² from its terms: α = 1, or with ``fit_scale`` the best α ≥ 0 per hypothesis."""
        if self.fit_scale:
            return cross.clamp_min(0) ** 2 / pp.clamp_min(1e-30) - xx
        return 2 * cross - pp - xx

    def score_grid(self, x: torch.Tensor, c: torch.Tensor, rotations: torch.Tensor,
                   shifts_px: torch.Tensor) -> torch.Tensor:
        """Log-likelihoods (B, H, S) of one set of rotations (H, 3, 3) and origins (S, 2) shared by all images
        (a global search), for transforms ``x`` and CTF ``c`` at the scored pixels (B, M).

        Each slice is computed once for all images, and the cross term of every (rotation, image, shift) is one
        real matrix product [Re P, −Im P] · [Re y; Im y]; the rotations go in chunks of ``chunk``.
        """
        B, M = x.shape
        if rotations.ndim != 3 or shifts_px.ndim != 2 or shifts_px.shape[-1] != 2:
            raise ValueError(f"rotations must be (H, 3, 3) and shifts (S, 2), got {tuple(rotations.shape)} and "
                             f"{tuple(shifts_px.shape)}")
        x = x.to(self.device, torch.complex64)
        c = c.to(self.device, torch.float32)
        w = self.weights
        S = shifts_px.shape[0]
        y = torch.conj(x[:, None, :] * self._ramp(shifts_px)[None]) * (c * w)[:, None, :]
        y_ri = torch.cat([y.real, y.imag], -1).reshape(B * S, 2 * M).T  # (2M, B·S)
        xx = ((x.real ** 2 + x.imag ** 2) * w).sum(-1)  # (B,)
        cw = (c * c * w).T  # (M, B)
        H = rotations.shape[0]
        out = torch.empty(B, H, S, device=self.device)
        for h0 in range(0, H, self.chunk):
            P = self.slices(rotations[h0:h0 + self.chunk])  # (h, M)
            cross = torch.cat([P.real, -P.imag], -1) @ y_ri  # (h, B·S)
            pp = (P.real ** 2 + P.imag ** 2) @ cw  # (h, B)
            block = self._combine(cross.reshape(-1, B, S), pp[..., None], xx[None, :, None])
            out[:, h0:h0 + self.chunk] = block.permute(1, 0, 2)
        return out

    def residual_power(self, x: torch.Tensor, c: torch.Tensor, rotations: torch.Tensor,
                       shifts_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ |X(s) − CTF · P_R|² and the pixel count per shell (n // 2 + 1 each, float64) of transforms ``x`` and
        CTF ``c`` at the scored pixels (B, M) at one pose each (B, 3, 3), (B, 2): what a noise estimate needs."""
        x = x.to(self.device, torch.complex64)
        r = x * self._ramp(shifts_px) - c.to(self.device) * self.slices(rotations)
        n_shells = self.lattice.box // 2 + 1
        power = (r.real ** 2 + r.imag ** 2).sum(0).to(torch.float64)
        sums = torch.zeros(n_shells, dtype=torch.float64, device=self.device).index_add_(0, self._shell, power)
        count = torch.zeros(n_shells, dtype=torch.float64, device=self.device).index_add_(
            0, self._shell, torch.full_like(power, float(x.shape[0])))
        return sums, count


@dataclass
class LocalPoses:
    """The best pose found per image."""

    rotations: torch.Tensor     # (B, 3, 3) best rotation (RELION matrices)
    shifts_px: torch.Tensor     # (B, 2) best extra origin (px, RELION sign), relative to the input images
    score: torch.Tensor         # (B,) its log-likelihood


def _offsets(step: float, dim: int, device: torch.device) -> torch.Tensor:
    """The grid {−step, 0, step}^dim (dim-vectors, zero first); only zero for step 0."""
    if step <= 0:
        return torch.zeros(1, dim, device=device)
    grid = sorted(itertools.product((-1.0, 0.0, 1.0), repeat=dim), key=lambda v: any(v))
    return torch.tensor(grid, device=device) * step


def local_search(scorer: PoseScorer, images_ft: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                 shifts_px: torch.Tensor | None = None, max_angle_deg: float = 6.0, max_shift_px: float = 2.0,
                 n_rounds: int = 4, angle_step_deg: float | None = None,
                 shift_step_px: float | None = None) -> LocalPoses:
    """Shrinking-grid search around ``rotations`` (B, 3, 3) and ``shifts_px`` (B, 2) (None: zeros).

    Each round scores, jointly, the 27 rotations ΔR(v) · A for v in {−a, 0, a}³ (rotation vectors, image frame)
    around the current best A and the 9 origins of {−t, 0, t}² around the current best, and keeps the best per
    image; a and t start at ``angle_step_deg`` / ``shift_step_px`` (default: half the maxima) and halve each
    round. Hypotheses farther than ``max_angle_deg`` (geodesic) or ``max_shift_px`` (Euclidean) from the start
    are not taken. The current best is always among the hypotheses, so the score never decreases. The last
    step (first / 2^(n_rounds − 1)) bounds the precision. Memory grows with B × 9 × pixels: pass batches.
    Only ``scorer.score`` and ``scorer.device`` are used, so a wrapper that adds priors to ``score`` works.
    """
    device = scorer.device
    A0 = rotations.to(device, torch.float32)
    B = A0.shape[0]
    s0 = torch.zeros(B, 2, device=device) if shifts_px is None else shifts_px.to(device, torch.float32)
    if n_rounds < 1:
        return LocalPoses(A0, s0, scorer.score(images_ft, ctf, A0[:, None], s0[:, None])[:, 0, 0])
    best_A, best_s = A0, s0
    a = math.radians(max_angle_deg / 2 if angle_step_deg is None else angle_step_deg)
    t = max_shift_px / 2 if shift_step_px is None else shift_step_px
    a, t = (a if max_angle_deg > 0 else 0.0), (t if max_shift_px > 0 else 0.0)
    rows = torch.arange(B, device=device)
    for _ in range(n_rounds):
        dR = rotation_from_vector(_offsets(a, 3, device))  # (H, 3, 3)
        cand_A = dR[None] @ best_A[:, None]  # (B, H, 3, 3)
        cand_s = best_s[:, None] + _offsets(t, 2, device)[None]  # (B, S, 2)
        scores = scorer.score(images_ft, ctf, cand_A, cand_s)
        far_A = angle_between_deg(A0[:, None], cand_A) > max_angle_deg + 1e-4
        far_s = (cand_s - s0[:, None]).norm(dim=-1) > max_shift_px + 1e-6
        scores = scores.masked_fill(far_A[:, :, None] | far_s[:, None, :], -math.inf)
        flat = scores.reshape(B, -1).argmax(-1)
        h, s = flat // cand_s.shape[1], flat % cand_s.shape[1]
        best_A, best_s = cand_A[rows, h], cand_s[rows, s]
        best = scores[rows, h, s]
        a, t = a / 2, t / 2
    return LocalPoses(best_A, best_s, best)
