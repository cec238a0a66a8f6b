"""vaepipe's models in plain PyTorch: `from vae import NVAE, NVAEConfig`."""
from vae.nvae import NVAE, NVAEConfig, NVAEOutput

__all__ = ["NVAE", "NVAEConfig", "NVAEOutput"]
