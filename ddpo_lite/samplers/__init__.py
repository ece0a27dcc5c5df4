"""Samplers: the policy's transition kernel, one file each (a Notation block in each step).

`ddim` is DDIM with eta > 0 (the DDPO policy), for the epsilon / v-prediction UNet families.
"""

from ddpo_lite.samplers.ddim import DDIMSampler, ddim_kl, ddim_mean_std, ddim_step_with_logprob

__all__ = ["DDIMSampler", "ddim_kl", "ddim_mean_std", "ddim_step_with_logprob"]
