"""Image data for MaskEmbed: sources (ImageFolder trees, webdataset shards), seeded transforms,
and the deterministic global-batch order."""
from .dataset import GlobalBatchOrder, SeededImages, collate, epoch_permutation, sample_rng, surface_worker_errors
from .sources import ImageFolderSource, TarShardSource, UnreadableImage, open_source
from .transforms import RKRC, EvalTransform

__all__ = [
    "GlobalBatchOrder", "SeededImages", "collate", "surface_worker_errors", "epoch_permutation", "sample_rng",
    "ImageFolderSource", "TarShardSource", "UnreadableImage", "open_source", "RKRC", "EvalTransform",
]
