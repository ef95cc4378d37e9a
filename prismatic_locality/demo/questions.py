"""Templated questions about the digit scenes, one-word answers, for the demo's VLM miniature.

Four families mirror the paper's VLM benchmarks (Fig. 5):

- ``count``     "how many digits are there ?"        -> 1..4       (TallyQA-like, spatial)
- ``presence``  "is there a 7 ?"                     -> yes / no   (a global question, POPE-like)
- ``position``  "where is the 4 ?"                   -> one of 9 cells of a 3x3 grid (RefCOCO-like)
- ``relation``  "is the 3 left of the 5 ?" / "... above ..."  -> yes / no  (VSR-like)

Answers come from the scene's label map (which pixels belong to which digit class) and its
metadata (which digits were placed, so two instances of one digit are counted as two). A question
whose answer the image does not settle is never generated:

- position/relation questions only name a digit that appears once in the scene;
- position: the digit's centre (the mean of its labelled pixels) lies at least `CELL_MARGIN`
  pixels from every cell boundary;
- relation: the two centres differ by at least `RELATION_MARGIN` pixels along the asked axis.

`balance` then subsamples every family to equal counts per answer, so the majority answer scores
exactly 1 / (number of answers) of a family: 25% count, 50% presence, 11.1% position, 50% relation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

FAMILIES = ("count", "presence", "position", "relation")
SPATIAL = ("count", "position", "relation")  # the paper's spatial benchmarks; presence is a global question
GRID = 3
CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
CELL_MARGIN = 2.0       # px: a centre closer than this to a cell boundary is ambiguous
RELATION_MARGIN = 4.0   # px: "left of" needs the centres this far apart in x ("above": in y)
MAX_COUNT = 4           # the scenes' max_digits

ANSWERS = {
    "count": tuple(str(k) for k in range(1, MAX_COUNT + 1)),
    "presence": ("yes", "no"),
    "position": CELLS,
    "relation": ("yes", "no"),
}

# Word-level vocabulary: every template word, digit and answer is one token.
SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
WORDS = ("how", "many", "digits", "are", "there", "?", "is", "a", "the", "where", "left", "of", "above",
         *(str(d) for d in range(10)), "yes", "no", *CELLS)
VOCAB = (*SPECIALS, *WORDS)
TOKEN = {w: i for i, w in enumerate(VOCAB)}


@dataclass(frozen=True)
class Question:
    scene: int              # index into the split's scenes (and its feature cache rows)
    family: str
    words: tuple[str, ...]  # the question, one token per word
    answer: str             # one token

    @property
    def text(self) -> str:
        return " ".join(self.words)


def encode(words: Sequence[str]) -> list[int]:
    try:
        return [TOKEN[w] for w in words]
    except KeyError as e:
        raise ValueError(f"word {e.args[0]!r} is not in the question vocabulary") from None


def cell_of(y: float, x: float, size: int) -> Optional[str]:
    """The 3x3 grid cell holding the point (y, x) of a size x size image; None within CELL_MARGIN of a boundary."""
    side = size / GRID
    for v in (y, x):
        edge = round(v / side) * side  # the nearest cell boundary (image borders included)
        if 0 < edge < size and abs(v - edge) < CELL_MARGIN:
            return None
    return CELLS[GRID * min(int(y // side), GRID - 1) + min(int(x // side), GRID - 1)]


def scene_questions(index: int, label_map: np.ndarray, digits: Sequence[int]) -> list[Question]:
    """Every unambiguous question about one scene.

    label_map: (H, W) class ids (0 background, d + 1 digit d); digits: the classes of the digits placed
    (one entry per instance, so [3, 3] is two threes)."""
    size = label_map.shape[0]
    present = set(digits)
    out = [Question(index, "count", ("how", "many", "digits", "are", "there", "?"), str(len(digits)))]
    out += [Question(index, "presence", ("is", "there", "a", str(d), "?"), "yes" if d in present else "no")
            for d in range(10)]
    centres = {}
    for d in sorted(d for d in present if list(digits).count(d) == 1):
        ys, xs = np.nonzero(label_map == d + 1)
        if len(ys):
            centres[d] = (float(ys.mean()), float(xs.mean()))
    for d, (y, x) in centres.items():
        cell = cell_of(y, x, size)
        if cell is not None:
            out.append(Question(index, "position", ("where", "is", "the", str(d), "?"), cell))
    for a, (ya, xa) in centres.items():
        for b, (yb, xb) in centres.items():
            if a == b:
                continue
            for rel, delta in (("left", xb - xa), ("above", yb - ya)):
                if abs(delta) >= RELATION_MARGIN:
                    words = ("is", "the", str(a), *(("left", "of") if rel == "left" else ("above",)), "the", str(b), "?")
                    out.append(Question(index, "relation", words, "yes" if delta > 0 else "no"))
    return out


def balance(questions: list[Question], rng: np.random.Generator, per_answer: Optional[int] = None) -> list[Question]:
    """Subsample every family to the same number of questions per answer (its rarest answer's count,
    at most `per_answer`); scene order kept. An answer that never occurs empties its family."""
    keep: list[Question] = []
    for family in FAMILIES:
        by_answer = {a: [q for q in questions if q.family == family and q.answer == a] for a in ANSWERS[family]}
        n = min(len(v) for v in by_answer.values())
        n = n if per_answer is None else min(n, per_answer)
        for group in by_answer.values():
            keep += [group[i] for i in sorted(rng.choice(len(group), size=n, replace=False))]
    return sorted(keep, key=lambda q: (q.scene, FAMILIES.index(q.family), q.words))


def make_questions(label_maps: np.ndarray, digits: Sequence[Sequence[int]], seed: int,
                   per_answer: Optional[dict] = None) -> list[Question]:
    """Balanced questions for a split: label_maps (n, H, W), digits[i] = the classes placed in scene i.

    per_answer caps each family's count per answer (the question mix), e.g. {"count": 500}."""
    if len(label_maps) != len(digits):
        raise ValueError(f"{len(label_maps)} label maps but {len(digits)} digit lists")
    pool = [q for i in range(len(label_maps)) for q in scene_questions(i, label_maps[i], digits[i])]
    rng = np.random.default_rng(seed)
    out: list[Question] = []
    for family in FAMILIES:
        cap = (per_answer or {}).get(family)
        out += balance([q for q in pool if q.family == family], rng, cap)
    return out


def majority_baseline(questions: Sequence[Question]) -> dict[str, float]:
    """Per family, the accuracy of always giving that family's most frequent answer."""
    out = {}
    for family in FAMILIES:
        answers = [q.answer for q in questions if q.family == family]
        if answers:
            _, counts = np.unique(answers, return_counts=True)
            out[family] = float(counts.max() / len(answers))
    return out


def placed_digits(digit_ids: np.ndarray) -> list[list[int]]:
    """`Scenes.digits` (n, max_digits) indices into scikit-learn's digits, -1 = none -> each scene's digit classes."""
    from .scenes import _load_digits

    targets = _load_digits()[1]
    return [[int(targets[k]) for k in row if k >= 0] for row in np.asarray(digit_ids)]
