"""quantduo: SVDQuant 4-bit diffusion models and DuoAttention long-context LLMs."""

__version__ = "0.1.0"
