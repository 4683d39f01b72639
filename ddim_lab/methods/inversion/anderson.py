"""Anderson acceleration of a fixed-point iteration z = g(z) (Anderson 1965, in the constrained form of Walker &
Ni 2011, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 49(4)), which AIDI (Pan et
al. 2023, "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion", ICCV) applies to the
implicit equation of each DDIM inversion step (``ddim_lab.methods.inversion.fixed_point``, Eq. 1).

Plain fixed-point iteration takes z_{k+1} = g(z_k); it converges only where g contracts, which for the
inversion step fails at high guidance (the guided ε amplifies a change of z). Anderson's method keeps the last
m_k + 1 iterates (m_k = min(m, k)), their images g_i = g(z_i) and residuals f_i = g_i − z_i, and takes

    α = argmin ‖ Σ_i α_i f_i ‖²   subject to  Σ_i α_i = 1,      i = k − m_k … k          (A1)
    z_{k+1} = Σ_i α_i g_i                                                                  (A2)

(A1) is a small least-squares problem per row: with the Gram matrix H_ij = ⟨f_i, f_j⟩ ((m_k+1) × (m_k+1)),
α = H⁻¹1 / (1ᵀH⁻¹1). It is solved in float64 with a ridge of ``ridge``·tr(H)/(m_k+1) on the diagonal, so
that collinear residuals (an iteration that has converged) give a finite α. For m = 0, or at k = 0, (A2) is
the plain step z_{k+1} = g(z_k). One network evaluation per iteration, as the plain iteration.
"""

from __future__ import annotations

from collections import deque

import torch


class Anderson:
    """The history of one batch of rows and the Anderson step (A1)–(A2) over it."""

    def __init__(self, m: int, ridge: float = 1e-10) -> None:
        if m < 0:
            raise ValueError(f"Anderson acceleration needs a window m >= 0, got {m}")
        self.m = m
        self.ridge = ridge
        self.images: deque[torch.Tensor] = deque(maxlen=m + 1)  # g_i, each (n, D)
        self.residuals: deque[torch.Tensor] = deque(maxlen=m + 1)  # f_i = g_i − z_i, each (n, D)

    def step(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z_{k+1} from the iterate z_k (n, C, H, W) and its image g(z_k) (n, C, H, W)."""
        n = len(z)
        self.images.append(g.reshape(n, -1).double())
        self.residuals.append((g - z).reshape(n, -1).double())
        if len(self.images) == 1:
            return g  # k = 0 (or m = 0): the plain fixed-point step
        F = torch.stack(list(self.residuals), dim=1)  # (n, m_k+1, D)
        G = torch.stack(list(self.images), dim=1)  # (n, m_k+1, D)
        # (A1): α = H⁻¹1 / (1ᵀH⁻¹1), H = F Fᵀ per row, ridged
        H = F @ F.transpose(1, 2)  # (n, m_k+1, m_k+1)
        size = H.shape[-1]
        scale = H.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=torch.finfo(H.dtype).tiny) / size  # (n,)
        H = H + self.ridge * scale[:, None, None] * torch.eye(size, dtype=H.dtype, device=H.device)
        ones = torch.ones(n, size, 1, dtype=H.dtype, device=H.device)
        w = torch.linalg.solve(H, ones)  # (n, m_k+1, 1)
        alpha = w / w.sum(1, keepdim=True)  # (n, m_k+1, 1), Σ α = 1
        # (A2): z_{k+1} = Σ α_i g_i
        mixed = (alpha * G).sum(1)  # (n, D)
        return mixed.reshape(z.shape).to(z.dtype)
