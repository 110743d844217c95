"""FashionChameleon: real-time, interactive garment switching in streaming video generation."""

__version__ = "0.1.0"
