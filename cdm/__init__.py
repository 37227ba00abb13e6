"""cdm: Cascaded Diffusion Models and SR3 super-resolution on Hugging Face diffusers."""

__version__ = "0.1.0"
