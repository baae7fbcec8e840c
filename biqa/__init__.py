"""biqa: synthetic distortion datasets and blind image quality assessment."""

__version__ = "0.1.0"
