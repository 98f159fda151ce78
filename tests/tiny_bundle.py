"""Settings of the tiny DAMM bundle the end-to-end tests train (one definition; tests override what they need).

32 px tiles -> 8 px latents (autoencoder 4x), denoiser bottleneck 2 px; four autoencoder iterations (one epoch of
the tiny split), eight diffusion iterations (two epochs), a few sampling steps. Passed as ``--key value``
overrides (or an ``--args_file``) to ``python -m monai.bundle run``.
"""

from __future__ import annotations

#: tiny networks
TINY_NET = {
    "ae_channels": [8, 8, 8],
    "ae_norm_num_groups": 8,
    "dm_channels": [8, 8, 8, 8],
    "dm_time_embed_dim": 16,
}
#: the embedded synthetic dataset, small
TINY_SYNTHETIC = {"n": 24, "size": 32, "divergent_fraction": 0.3, "seed": 0}
#: stage budgets, sampling and logging
TINY_STAGES = {
    "ae_iterations": 4,
    "ae_batch_size": 4,
    "ae_adversarial_start_iteration": 0,
    "ae_disc_layers": 2,
    "ae_val_interval": 1,
    "dm_iterations": 8,
    "dm_batch_size": 4,
    "dm_divergence_aware_start_fraction": 0.375,
    "num_inference_steps": 3,
    "eval_num_samples": 2,
    "eval_ddpm_items": 0,
    "eval_batch_size": 8,
    "progress": False,
    "log_every": 1,
}
#: the whole tiny main job
TINY = {**TINY_NET, "synthetic_args": TINY_SYNTHETIC, **TINY_STAGES}
