"""Pipeline loading and the offline tiny Stable Diffusion model."""

from .loading import ModelLoadError, load_pipeline
from .tiny import build_tiny_pipeline, tiny_pipeline_dir

__all__ = ["ModelLoadError", "build_tiny_pipeline", "load_pipeline", "tiny_pipeline_dir"]
