"""prismatic-locality: locality alignment (MaskEmbed) for vision transformers.

align (MaskEmbed trainer) -> probe (patch-level probing) -> Prismatic plugin (VLMs).
The core never imports Prismatic; only `prismatic_locality.prismatic` does.
"""
__version__ = "0.1.0"
