"""Flow matching as the three stages use it (docs/method.md §1, §5): the shifted training table, its loss weights,
noising and the loss (the in-context forward itself is `models.causal_wan.in_context_velocity`).

x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, so x0 = x_t - sigma v.
"""

from __future__ import annotations

import torch


class FlowTable:
    """The N-step training table: sigma_i = shift(1 - i/N) for i = 0..N-1, t_i = N sigma_i (smallest t ~ 4.98).

    `weights[i]` is the Wan/DiffSynth bell curve exp(-2 ((t_i - N/2) / N)^2), shifted to 0 at its minimum and
    normalised to mean 1 over the table.
    """

    def __init__(self, num_train_timesteps: int, shift: float, device: torch.device | str = "cpu") -> None:
        n = num_train_timesteps
        self.num_train_timesteps, self.shift_factor = n, shift
        self.sigmas = self.shift(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]).float().to(device)
        self.timesteps = self.sigmas * n
        bell = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        bell = bell - bell.min()
        self.weights = bell * (n / bell.sum())

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device | str = "cpu") -> "FlowTable":
        """The table of the pipeline's flow-matching scheduler (its step count and shift)."""
        return cls(scheduler.config.num_train_timesteps, scheduler.config.shift, device)

    def shift(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep shift: sigma' = s sigma / (1 + (s - 1) sigma)."""
        return self.shift_factor * sigma / (1 + (self.shift_factor - 1) * sigma)

    def sample_index(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Uniform table indices (stages 1-2: one per sample or per chunk)."""
        return torch.randint(0, self.num_train_timesteps, shape, generator=generator, device=generator.device)

    def sample_dmd_sigma(self, batch: int, clamp: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
        """DMD/critic noise level per sample [B] (docs/method.md §4.3): u ~ U{0..N-1}/N, shifted, clamped to `clamp`."""
        u = self.sample_index((batch,), generator).double() / self.num_train_timesteps
        return self.shift(u).clamp(*clamp).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t for latents [B, C, F, h, w] at sigma [B] or per frame [B, F]."""
    return (1 - _frames(sigma)) * x0 + _frames(sigma) * noise


def predict_x0(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma v, in fp32."""
    return noisy.float() - _frames(sigma) * velocity.float()


def _frames(sigma: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] -> broadcastable over [B, C, F, h, w]."""
    sigma = sigma.float()
    return sigma.view(-1, 1, 1, 1, 1) if sigma.ndim == 1 else sigma[:, None, :, None, None]


def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor,
                       frame_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over [B, C, F, h, w] of (v - (eps - x0))^2, each frame scaled by `frame_weights` [B, F] if given."""
    per_frame = (velocity.float() - (noise.float() - x0.float())).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    if frame_weights is not None:
        per_frame = per_frame * frame_weights
    return per_frame.mean()
