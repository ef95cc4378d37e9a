"""Probing targets (paper App. B; docs/probe.md): per-patch and per-image multi-hot labels from a segmentation map.

The label map is centre-cropped to the largest square and resized (nearest) to the backbone's
resolution exactly like the image, then reduced on the backbone's patch grid:

- local  ("union"):        class c is positive in a patch if any pixel of c lies in it; class 0
                            (unlabeled / other / background) only when it is the patch's *only* class.
- global ("global-union"): class c is positive if any pixel of c lies anywhere in the image; class 0
                            is positive whenever present (no override).

Tail pixels beyond the patch grid (384 px, 14 px patches -> 27 x 27, 6 px dropped) are dropped
first, as timm's conv patch embed never sees them; the object sizes (pixel fractions per class,
for the size-stratified recall) are measured on the same trimmed map.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_square(img: Image.Image) -> Image.Image:
    """The largest centred square (side = min(H, W))."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def prepare_image(img: Image.Image, size: int) -> Image.Image:
    """Centre square + bilinear resize; PIL's bilinear filter antialiases when downsampling,
    as torchvision's Resize on PIL images (the reference pipeline) does."""
    return center_square(img.convert("RGB")).resize((size, size), Image.BILINEAR)


def prepare_label(lbl: Image.Image, size: int) -> Image.Image:
    """Same crop as the image, nearest-neighbour resize (labels must not be interpolated)."""
    return center_square(lbl).resize((size, size), Image.NEAREST)


def reduce_labels(label_map: torch.Tensor, patch_size: int, num_classes: int):
    """(H, W) integer class map -> (patch (P*P, C) bool, image (C,) bool, fractions (C,) float32).

    Vectorised: every pixel scatters a True into (its patch, its class); no Python loop over patches.
    """
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {tuple(label_map.shape)}")
    P = min(label_map.shape) // patch_size
    if P == 0:
        raise ValueError(f"label map {tuple(label_map.shape)} is smaller than one {patch_size}px patch")
    lbl = label_map[: P * patch_size, : P * patch_size].long()  # drop the tail pixels
    rows = torch.arange(P * patch_size) // patch_size
    patch_index = (rows[:, None] * P + rows[None, :]).reshape(-1)
    flat = lbl.reshape(-1)
    present = torch.zeros(P * P * num_classes, dtype=torch.bool)
    present[patch_index * num_classes + flat] = True
    present = present.view(P * P, num_classes)
    counts = torch.bincount(flat, minlength=num_classes)
    image = counts > 0  # class 0 positive whenever present
    fractions = counts.float() / flat.numel()
    # class 0 only when alone in the patch
    present[:, 0] &= ~present[:, 1:].any(dim=1)
    return present, image, fractions


def pack(bits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Bool (..., C) -> uint8 (..., ceil(C/8)): 183 classes x 729 patches = 17 kB per image."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1)


def unpack(packed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """uint8 (..., ceil(C/8)) -> bool (..., C); works on any device (np.packbits order: MSB first)."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :num_classes].bool()


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------

# COCO-Stuff 164k: index = (PNG value + 1) mod 256 = COCO category id; 0 = unlabeled (PNG 255).
# Thing ids 1-91 include the 11 ids COCO never uses (street sign, hat, ...): they have no val
# positives and so drop out of the macro average automatically.
COCO_STUFF_CLASSES = (
    "unlabeled",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff, ids 92-182
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

# ADE20k SceneParsing (ADEChallengeData2016): annotation value = index; 0 = "other".
ADE20K_CLASSES = (
    "other",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

assert len(COCO_STUFF_CLASSES) == 183 and len(ADE20K_CLASSES) == 151


def class_kinds(dataset: str, num_classes: int) -> dict[str, range]:
    """Groups of class ids whose improvements are ranked separately (paper Fig. 7): COCO-Stuff's
    things (ids 1-91) and stuff (92-182); one group of all classes for the other datasets."""
    if dataset == "coco-stuff" and num_classes == len(COCO_STUFF_CLASSES):
        return {"things": range(1, 92), "stuff": range(92, 183)}
    return {"classes": range(num_classes)}
