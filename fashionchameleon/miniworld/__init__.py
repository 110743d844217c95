"""Mini wardrobe world (issue 7): a seeded procedural world of people, garments and motions, and metrics that are
exact in it. `world` draws and renders clips and the paper's triplets; `metrics` scores videos against its truth."""

from .world import (Garment, Motion, Person, Triplet, make_triplet, render, sample_garment, sample_motion,
                    sample_person)

__all__ = ["Garment", "Motion", "Person", "Triplet", "make_triplet", "render", "sample_garment", "sample_motion",
           "sample_person"]
