"""EDM preconditioning (Karras et al. 2022) on the flow time axis.

EDM noises x_sigma = x_0 + sigma eps and wraps the network F as
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), so F's input and target both have unit
variance at every noise level. With sigma = t / (1 - t), x_sigma = x_t / (1 - t) for the
rectified-flow state x_t = (1 - t) x_0 + t eps; we keep x_t as the state (so the flow samplers
apply unchanged, and t = 1 is finite) and fold 1 / (1 - t) into the coefficients
(schedules.edm_preconditioning). EDM's log-normal sigma, ln sigma ~ N(P_mean, P_std), is exactly
logit-normal t with logit_mean = P_mean, logit_std = P_std, since logit(t) = ln sigma.
The network is given t (its own timestep embedding replaces EDM's c_noise = ln(sigma) / 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_video.diffusion.objective import Objective, ObjectiveConfig, _bcast
from dit_video.diffusion.schedules import edm_preconditioning


@dataclass
class EDMConfig(ObjectiveConfig):
    """EDM: ObjectiveConfig with EDM's defaults plus sigma_data."""

    kind: str = "edm"  # fixed for this class
    target: str = "edm"  # the preconditioned target F = (x_0 - c_skip x_t) / c_out (only choice)
    timestep_sampling: str = "logit_normal"  # EDM's log-normal sigma
    logit_mean: float = -1.2  # EDM's P_mean
    logit_std: float = 1.2  # EDM's P_std
    sigma_data: float = (
        1.0  # std of the data; 1 for our normalised latents (EDM used 0.5 for pixels in [-1, 1])
    )

    def validate(self) -> None:
        super().validate()
        if self.sigma_data <= 0:
            raise ValueError(f"objective.sigma_data={self.sigma_data} must be > 0")


class EDM(Objective):
    """EDM preconditioning and loss; loss_weighting "objective" (= "none" on F) is EDM's lambda(sigma)."""

    kind = "edm"
    targets = ("edm",)
    native_target = "edm"  # EDM's lambda(sigma) = 1 / c_out^2 on the x_0 MSE: unit weight on F
    flow_path = True

    def alpha_sigma(self, t):
        return 1.0 - t, t

    def model_input(self, x_t, t):
        c_in, _, _ = edm_preconditioning(t, self.cfg.sigma_data)
        return _bcast(c_in, x_t) * x_t

    def target(self, latents, noise, x_t, t):
        _, c_skip, c_out = (_bcast(c, latents) for c in edm_preconditioning(t, self.cfg.sigma_data))
        return (latents - c_skip * x_t) / c_out

    def predict_x0_eps(self, pred, x_t, t):
        _, c_skip, c_out = (_bcast(c, x_t) for c in edm_preconditioning(t, self.cfg.sigma_data))
        x0 = c_skip * x_t + c_out * pred
        t = _bcast(t, x_t)
        return x0, (x_t - (1.0 - t) * x0) / t

    def x0_scale(self, t, target=None):
        return edm_preconditioning(t, self.cfg.sigma_data)[2]  # c_out
