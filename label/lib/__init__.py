"""The DAMM-Diffusion / DRDM MONAI Label app's library (imported as ``lib`` from the app folder, like MONAI Label's
sample apps)."""
