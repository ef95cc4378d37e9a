"""The demo's VLM miniature: Prismatic's single-stage recipe on frozen cached features.

A VLM here is (frozen vision features) -> adapter -> a tiny Llama trained from scratch on the
templated questions of `questions.py`. The inputs are laid out as Prismatic's ``PrismaticVLM.forward``
lays them out (https://github.com/TRI-ML/prismatic-vlms, prismatic/models/vlms/prismatic.py):

    [BOS] [visual token 1 .. T] [question words] [answer]

with the loss on the answer token only (the visual tokens and the prompt are ignored, -100).
The three configurations of the paper's controlled comparison (§5) share the data, the batch order,
the LM's initialisation and every hyperparameter; only the features and the adapter differ:

- ``teacher + MLP``      the teacher's features, Prismatic's ``gelu-mlp`` adapter;
- ``aligned + MLP``      the aligned backbone's features, the same adapter;
- ``aligned + decoder``  the aligned backbone's features, the MaskEmbed decoder as the adapter
  (`DecoderProjector`, built from the checkpoint exactly as the Prismatic plugin builds it).

Features are the probe cache's (the last block after the final norm, every token, CLS included),
which is what the plugin's aligned backbone hands Prismatic (`prismatic/features.py`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import questions as Q

log = logging.getLogger(__name__)

IGNORE = -100  # Prismatic's IGNORE_INDEX: positions without loss


@dataclass(frozen=True)
class VLMSizes:
    """The VLM stage's settings; the same for every configuration."""

    llm_width: int = 64
    llm_depth: int = 2
    llm_heads: int = 4
    llm_mlp_ratio: int = 4          # the MLP's hidden width / llm_width
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0      # Prismatic's
    seeds: tuple = (0, 1)           # training seeds (LM and adapter init, batch order)
    # the question mix: at most this many questions per answer, per family (None = all that balance allows)
    train_per_answer: dict = field(default_factory=lambda: {"count": None, "presence": 1000, "position": None,
                                                            "relation": 1000})
    val_per_answer: dict = field(default_factory=lambda: {"count": None, "presence": 500, "position": None,
                                                          "relation": 500})


FULL = VLMSizes()
QUICK = VLMSizes(llm_width=32, llm_depth=1, llm_heads=2, steps=6, batch=16, warmup=2, seeds=(0, 1),
                 train_per_answer={f: 8 for f in Q.FAMILIES}, val_per_answer={f: 4 for f in Q.FAMILIES})

# name -> (backbone, adapter)
CONFIGS = {"teacher + MLP": ("teacher", "mlp"), "aligned + MLP": ("aligned", "mlp"),
           "aligned + decoder": ("aligned", "decoder")}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class GeluMLPProjector(nn.Sequential):
    """Prismatic's ``gelu-mlp`` adapter (``MLPProjector`` in prismatic/util/nn_utils.py):
    Linear(vision, llm) -> GELU -> Linear(llm, llm), PyTorch's default init."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


def require_transformers() -> None:
    """One line up front (not after the probing demo's 10 minutes) when the `vlm` extra is missing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError("the VLM miniature needs transformers: pip install 'prismatic-locality[vlm]'")


def build_llm(sizes: VLMSizes):
    """A tiny LlamaForCausalLM over the question vocabulary, randomly initialised (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(Q.VOCAB), hidden_size=sizes.llm_width, intermediate_size=sizes.llm_mlp_ratio * sizes.llm_width,
                      num_hidden_layers=sizes.llm_depth, num_attention_heads=sizes.llm_heads,
                      num_key_value_heads=sizes.llm_heads, max_position_embeddings=128,
                      pad_token_id=Q.PAD, bos_token_id=Q.BOS, eos_token_id=Q.EOS, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"  # set directly: the constructor keyword differs across transformers 4.41 / 5.x
    return LlamaForCausalLM(cfg)


def build_adapter(kind: str, vision_dim: int, llm_dim: int, checkpoint=None) -> nn.Module:
    """`mlp`: Prismatic's gelu-mlp; `decoder`: the plugin's DecoderProjector from the aligned checkpoint."""
    if kind == "mlp":
        return GeluMLPProjector(vision_dim, llm_dim)
    if kind == "decoder":
        from ..checkpoint import load_aligned
        from ..prismatic.projector import DecoderProjector, projector_init

        if checkpoint is None:
            raise ValueError("the decoder adapter needs the aligned checkpoint")
        # as the plugin's AlignedViTBackbone + PrismaticVLM.__init__ patch (registry.py) build it
        return DecoderProjector.from_init(projector_init(load_aligned(checkpoint, attn_impl="math")), llm_dim)
    raise ValueError(f"unknown adapter '{kind}' (mlp | decoder)")


def multimodal_inputs(text: torch.Tensor, visual: torch.Tensor, attention_mask: torch.Tensor,
                      labels: Optional[torch.Tensor] = None):
    """Prismatic's layout: the visual tokens go right after BOS, before the text; they get no loss.

    text (B, L, d) embedded [BOS, words..., answer]; visual (B, T, d) -> (B, 1 + T + L - 1, d) and
    the matching attention mask and labels."""
    B, T = visual.shape[:2]
    embeds = torch.cat([text[:, :1], visual, text[:, 1:]], dim=1)
    mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(B, T), attention_mask[:, 1:]], dim=1)
    if labels is not None:
        labels = torch.cat([labels[:, :1], labels.new_full((B, T), IGNORE), labels[:, 1:]], dim=1)
    return embeds, mask, labels


class MiniVLM(nn.Module):
    def __init__(self, adapter: nn.Module, llm: nn.Module):
        super().__init__()
        self.adapter, self.llm = adapter, llm

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None):
        text = self.llm.get_input_embeddings()(input_ids)
        embeds, mask, labels = multimodal_inputs(text, self.adapter(features), attention_mask, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)


def encode_batch(questions: Sequence[Q.Question]) -> dict[str, torch.Tensor]:
    """[BOS, question words, answer], right-padded; labels = the answer token only; answer_at = its index."""
    seqs = [[Q.BOS, *Q.encode(q.words), Q.TOKEN[q.answer]] for q in questions]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), Q.PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
    at = torch.tensor([len(s) - 1 for s in seqs])
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, at[i]] = s[-1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "answer_at": at}


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


def _schedule(step: int, sizes: VLMSizes) -> float:
    """Linear warmup, then cosine to zero (Prismatic's schedule)."""
    if step < sizes.warmup:
        return (step + 1) / sizes.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - sizes.warmup) / max(1, sizes.steps - sizes.warmup)))


def batch_order(n: int, sizes: VLMSizes, seed: int) -> np.ndarray:
    """(steps, batch) question indices: shuffled passes over the training questions, from `seed` only."""
    rng = np.random.default_rng([seed, 7])
    need = sizes.steps * sizes.batch
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return order[:need].reshape(sizes.steps, sizes.batch)


def build_vlm(kind: str, vision_dim: int, sizes: VLMSizes, seed: int, checkpoint=None) -> MiniVLM:
    """The LM's init depends on the seed only, so every configuration starts from the same LM."""
    torch.manual_seed(seed)
    llm = build_llm(sizes)
    torch.manual_seed(seed + 1)
    return MiniVLM(build_adapter(kind, vision_dim, sizes.llm_width, checkpoint), llm)


def train_vlm(model: MiniVLM, features: torch.Tensor, questions: Sequence[Q.Question], sizes: VLMSizes, seed: int,
              bar: Optional[tqdm] = None) -> list[float]:
    """Adapter and LM trained together (Prismatic's single-stage "finetune"), the backbone frozen
    (its features are cached). Returns the loss every 50 steps."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": sizes.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=sizes.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, sizes))
    batches = encode_batch(questions)
    scene = torch.tensor([q.scene for q in questions])
    losses = []
    for step, idx in enumerate(batch_order(len(questions), sizes, seed)):
        idx = torch.from_numpy(idx)
        out = model(features[scene[idx]], batches["input_ids"][idx], batches["attention_mask"][idx],
                    batches["labels"][idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(params, sizes.max_grad_norm)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == sizes.steps - 1:
            losses.append(round(out.loss.item(), 4))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if bar is not None:
            bar.update(1)
    return losses


@torch.no_grad()
def predict(model: MiniVLM, features: torch.Tensor, questions: Sequence[Q.Question], batch: int = 500) -> list[str]:
    """The most likely next token after the question mark (over the whole vocabulary)."""
    model.eval()
    preds = []
    for lo in range(0, len(questions), batch):
        qs = questions[lo:lo + batch]
        b = encode_batch(qs)
        ids = b["input_ids"].clone()
        ids[torch.arange(len(qs)), b["answer_at"]] = Q.PAD  # the answer is not shown
        logits = model(features[torch.tensor([q.scene for q in qs])], ids, b["attention_mask"]).logits
        T = logits.shape[1] - ids.shape[1]  # visual tokens
        at = T + b["answer_at"] - 1  # the position whose next-token prediction is the answer
        preds += [Q.VOCAB[i] for i in logits[torch.arange(len(qs)), at].argmax(-1).tolist()]
    return preds


def accuracy(questions: Sequence[Q.Question], preds: Sequence[str]) -> dict[str, float]:
    """Per family; `overall` = mean over the four families, `spatial` = over count/position/relation."""
    acc = {}
    for f in Q.FAMILIES:
        hits = [p == q.answer for q, p in zip(questions, preds) if q.family == f]
        if hits:
            acc[f] = float(np.mean(hits))
    acc["overall"] = float(np.mean([acc[f] for f in Q.FAMILIES if f in acc]))
    acc["spatial"] = float(np.mean([acc[f] for f in Q.SPATIAL if f in acc]))
    return acc


def run_stage(features: dict, questions: dict, sizes: VLMSizes, checkpoint) -> dict:
    """Train and evaluate every configuration for every seed.

    features[backbone][split]: (N, T, D) float tensors; questions[split]: lists of `Question`."""
    from ..vit import count_params

    per_seed: dict = {name: {} for name in CONFIGS}
    losses: dict = {name: {} for name in CONFIGS}
    params: dict = {}
    t0 = time.perf_counter()
    total = len(CONFIGS) * len(sizes.seeds) * sizes.steps
    with tqdm(total=total, desc="vlm", unit="step", dynamic_ncols=True) as bar:
        for seed in sizes.seeds:
            for name, (backbone, adapter) in CONFIGS.items():
                bar.set_description(f"vlm {name} seed {seed}")
                train_f, val_f = features[backbone]["train"], features[backbone]["val"]
                model = build_vlm(adapter, train_f.shape[-1], sizes, seed, checkpoint)
                params[name] = {"adapter": count_params(model.adapter), "llm": count_params(model.llm)}
                losses[name][seed] = train_vlm(model, train_f, questions["train"], sizes, seed, bar)
                acc = accuracy(questions["val"], predict(model, val_f, questions["val"]))
                for k, v in acc.items():
                    per_seed[name].setdefault(k, []).append(v)
                log.info("%s seed %d: %s", name, seed, acc)
    mean = {name: {k: float(np.mean(v)) for k, v in accs.items()} for name, accs in per_seed.items()}
    base = Q.majority_baseline(questions["val"])
    base["overall"] = float(np.mean([base[f] for f in Q.FAMILIES if f in base]))
    base["spatial"] = float(np.mean([base[f] for f in Q.SPATIAL if f in base]))
    count = lambda qs: {f: sum(q.family == f for q in qs) for f in Q.FAMILIES}  # noqa: E731
    return {
        "accuracy": mean,
        "accuracy_per_seed": per_seed,
        "majority_baseline": base,
        "configs": {name: {"backbone": b, "adapter": a, "params": params.get(name)} for name, (b, a) in CONFIGS.items()},
        "questions": {split: count(qs) for split, qs in questions.items()},
        "examples": [{"question": q.text, "answer": q.answer, "family": q.family}
                     for q in _examples(questions["val"])],
        "train_loss": losses,
        "settings": {**asdict(sizes), "seeds": list(sizes.seeds)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _examples(questions: Sequence[Q.Question]) -> list[Q.Question]:
    """One question per family, for the report."""
    seen, out = set(), []
    for q in questions:
        if q.family not in seen:
            seen.add(q.family)
            out.append(q)
    return out
