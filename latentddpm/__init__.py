"""latentddpm: text-to-image latent diffusion on the Hugging Face stack."""

__version__ = "0.1.0"
