"""The demo's VLM miniature: questions, adapters, the LM's input layout, and `--quick` end to end."""
import collections
import json

import numpy as np
import pytest
import torch

from prismatic_locality.demo import questions as Q
from prismatic_locality.demo import scenes as S
from prismatic_locality.demo import vlm as M

from test_prismatic_modules import make_tiny_checkpoint


def _blob(label_map, d, y, x, r=2):
    """Paint digit d as a (2r+1)^2 square centred at (y, x)."""
    label_map[y - r:y + r + 1, x - r:x + r + 1] = d + 1


def _hand_made():
    """48 px scene: a 3 top-left, a 5 bottom-right, two 7s (left-centre and top-right)."""
    lab = np.zeros((48, 48), np.uint8)
    _blob(lab, 3, 6, 6)
    _blob(lab, 5, 40, 41)
    _blob(lab, 7, 24, 6)
    _blob(lab, 7, 6, 40)
    return lab, [3, 5, 7, 7]


def _by(qs, family):
    return {q.text: q.answer for q in qs if q.family == family}


# ------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------


def test_answers_follow_the_label_map_and_the_placed_digits():
    lab, digits = _hand_made()
    qs = Q.scene_questions(0, lab, digits)
    assert _by(qs, "count") == {"how many digits are there ?": "4"}  # two 7s count as two
    presence = _by(qs, "presence")
    assert len(presence) == 10
    assert all(presence[f"is there a {d} ?"] == ("yes" if d in (3, 5, 7) else "no") for d in range(10))
    # the 7 appears twice: never asked "where", never part of a relation
    assert _by(qs, "position") == {"where is the 3 ?": "top-left", "where is the 5 ?": "bottom-right"}
    assert _by(qs, "relation") == {"is the 3 left of the 5 ?": "yes", "is the 5 left of the 3 ?": "no",
                                   "is the 3 above the 5 ?": "yes", "is the 5 above the 3 ?": "no"}
    assert all(q.words[-1] == "?" and q.answer in Q.ANSWERS[q.family] for q in qs)
    assert all(len(Q.encode([q.answer])) == 1 for q in qs)  # one-token answers


def test_ambiguous_questions_are_not_generated():
    lab = np.zeros((48, 48), np.uint8)
    _blob(lab, 1, 16, 6)    # centre on the boundary between the top and middle rows of cells
    _blob(lab, 2, 40, 8)    # 2 px right of the 1 (< RELATION_MARGIN), far below it
    qs = Q.scene_questions(0, lab, [1, 2])
    assert _by(qs, "position") == {"where is the 2 ?": "bottom-left"}
    assert _by(qs, "relation") == {"is the 1 above the 2 ?": "yes", "is the 2 above the 1 ?": "no"}
    assert Q.cell_of(17.0, 30.0, 48) is None and Q.cell_of(18.0, 30.0, 48) == "centre"
    assert Q.cell_of(0.0, 47.0, 48) == "top-right"  # the image border is no ambiguity


def test_generated_questions_are_balanced_and_unambiguous():
    sc = S.make_scenes(300, "val", 5, progress=False)
    digits = Q.placed_digits(sc.digits)
    qs = Q.make_questions(sc.labels, digits, seed=0, per_answer={"presence": 40})
    for family in Q.FAMILIES:
        counts = collections.Counter(q.answer for q in qs if q.family == family)
        assert set(counts) == set(Q.ANSWERS[family]), family
        assert len(set(counts.values())) == 1, (family, counts)   # balanced exactly (tolerance 0)
    assert collections.Counter(q.answer for q in qs if q.family == "presence")["yes"] == 40
    base = Q.majority_baseline(qs)
    assert base == pytest.approx({f: 1 / len(Q.ANSWERS[f]) for f in Q.FAMILIES})
    # re-derive each spatial answer from the scene: unique digit, centre clear of every boundary/margin
    for q in qs:
        lab, ds = sc.labels[q.scene], digits[q.scene]
        if q.family == "count":
            assert int(q.answer) == len(ds) == np.count_nonzero(sc.digits[q.scene] >= 0)
        named = [int(w) for w in q.words if w.isdigit()]
        if q.family in ("position", "relation"):
            assert all(ds.count(d) == 1 for d in named)
            centres = [np.argwhere(lab == d + 1).mean(0) for d in named]
        if q.family == "position":
            y, x = centres[0]
            assert all(min(abs(v - b) for b in (16, 32)) >= Q.CELL_MARGIN for v in (y, x))
            assert q.answer == Q.CELLS[3 * int(y // 16) + int(x // 16)]
        if q.family == "relation":
            axis = 1 if "left" in q.words else 0
            gap = centres[1][axis] - centres[0][axis]
            assert abs(gap) >= Q.RELATION_MARGIN and q.answer == ("yes" if gap > 0 else "no")
    # seeded
    assert Q.make_questions(sc.labels, digits, seed=0, per_answer={"presence": 40}) == qs


def test_train_and_val_questions_are_about_disjoint_digit_instances():
    train, val = S.make_scenes(200, "train", 0, progress=False), S.make_scenes(100, "val", 0, progress=False)
    used = lambda sc: set(sc.digits[sc.digits >= 0].tolist())  # noqa: E731
    assert used(train) and used(val) and not used(train) & used(val)


def test_a_word_outside_the_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="'banana'"):
        Q.encode(["is", "banana"])


# ------------------------------------------------------------------------------------------------
# Adapters and the LM's inputs
# ------------------------------------------------------------------------------------------------


def test_decoder_adapter_is_the_plugins_decoder_projector(tmp_path):
    from prismatic_locality.checkpoint import load_aligned
    from prismatic_locality.prismatic.features import load_featurizer
    from prismatic_locality.prismatic.projector import DecoderProjector

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", kind="in1k")
    adapter = M.build_adapter("decoder", 48, 40, ckpt)
    assert type(adapter) is DecoderProjector
    aligned = load_aligned(ckpt)
    sd = adapter.state_dict()
    for k, v in aligned.decoder.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    for k, v in aligned.encoder.head.state_dict().items():
        assert torch.equal(sd[f"in_proj.{k}"], v), k
    assert not sd["head.weight"].any() and not sd["head.bias"].any()
    # exactly what the plugin builds from the same checkpoint
    _, init, _ = load_featurizer(ckpt)
    plugin = DecoderProjector.from_init(init, 40).state_dict()
    assert sd.keys() == plugin.keys() and all(torch.equal(sd[k], plugin[k]) for k in sd)
    # the visual tokens: one per feature token (prefix included), in order
    featurizer, _, _ = load_featurizer(ckpt)
    f = featurizer(torch.randn(2, 3, 32, 32))
    assert f.shape[1] == 1 + 16 and adapter(f).shape == (2, 17, 40)
    mlp = M.build_adapter("mlp", 48, 40)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"] and mlp(f).shape == (2, 17, 40)
    with pytest.raises(ValueError, match="mlp | decoder"):
        M.build_adapter("linear", 48, 40)


def test_visual_tokens_follow_bos_and_only_the_answer_has_loss():
    qs = [Q.Question(0, "count", ("how", "many", "digits", "are", "there", "?"), "3"),
          Q.Question(1, "presence", ("is", "there", "a", "7", "?"), "no")]
    b = M.encode_batch(qs)
    assert b["input_ids"][0].tolist() == [Q.BOS, *Q.encode(qs[0].words), Q.TOKEN["3"]]
    assert b["input_ids"][1].tolist() == [Q.BOS, *Q.encode(qs[1].words), Q.TOKEN["no"], Q.PAD]
    assert b["attention_mask"][1].tolist() == [1] * 7 + [0]
    assert b["answer_at"].tolist() == [7, 6]
    T, d = 5, 8
    text = torch.arange(2 * 8, dtype=torch.float).view(2, 8, 1).expand(2, 8, d)
    visual = -torch.ones(2, T, d)
    embeds, mask, labels = M.multimodal_inputs(text, visual, b["attention_mask"], b["labels"])
    assert torch.equal(embeds[:, 0], text[:, 0])                    # BOS first
    assert torch.equal(embeds[:, 1:1 + T], visual)                  # then every visual token, in order
    assert torch.equal(embeds[:, 1 + T:], text[:, 1:])              # then the text
    assert mask[1].tolist() == [1] * (7 + T) + [0]
    assert labels[0].tolist() == [M.IGNORE] * (7 + T) + [Q.TOKEN["3"]]
    assert labels[1].tolist() == [M.IGNORE] * (6 + T) + [Q.TOKEN["no"], M.IGNORE]


def test_the_vlm_loss_is_the_answer_tokens_cross_entropy(one_thread):
    sizes = M.QUICK
    model = M.build_vlm("mlp", 16, sizes, seed=0)
    qs = [Q.Question(0, "count", ("how", "many", "digits", "are", "there", "?"), "2"),
          Q.Question(1, "position", ("where", "is", "the", "4", "?"), "top")]
    feats = torch.randn(2, 5, 16)
    b = M.encode_batch(qs)
    out = model(feats, b["input_ids"], b["attention_mask"], b["labels"])
    logits = out.logits
    at = 5 + b["answer_at"] - 1  # the answer is predicted from the token before it
    want = torch.nn.functional.cross_entropy(logits[torch.arange(2), at], b["input_ids"][torch.arange(2), b["answer_at"]])
    torch.testing.assert_close(out.loss, want)
    # the same LM for every adapter: its init depends on the seed only
    other = M.build_vlm("mlp", 24, sizes, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.llm.state_dict().values(), other.llm.state_dict().values()))


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_with_vlm_then_demo_vlm_on_its_directory(tmp_path):
    from prismatic_locality.demo import run as D
    from prismatic_locality.demo import vlm_args
    from prismatic_locality.prismatic.features import load_featurizer
    from prismatic_locality.probe.features import build_split  # noqa: F401  (the cache the stage reads)

    out = tmp_path / "demo"
    assert D.main(["--quick", "--vlm", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    vlm = res["vlm"]
    assert set(vlm["accuracy"]) == set(M.CONFIGS)
    for name, acc in vlm["accuracy"].items():
        for c in (*Q.FAMILIES, "spatial", "overall"):
            assert 0.0 <= acc[c] <= 1.0
            per = vlm["accuracy_per_seed"][name][c]
            assert len(per) == 2 and acc[c] == pytest.approx(np.mean(per))
    assert vlm["settings"]["seeds"] == [0, 1000]
    assert vlm["majority_baseline"]["position"] == pytest.approx(1 / 9)
    assert {"recall", "delta_points", "teacher", "align", "config"} <= set(res) and "vlm" in res["timing_s"]
    md = (out / "report.md").read_text()
    assert "## VLM miniature" in md and "vlm.png" in md and (out / "vlm.png").stat().st_size > 0

    # the cached features are the plugin featurizer's tokens: CLS first, then the patches row-major
    from prismatic_locality.probe.datasets import ProbeDataset
    ds = ProbeDataset("demo", out / "scenes", "val", 48, 8)
    cached = np.load(next(p for p in (out / "cache").glob("features-*") if
                          json.loads((p / "meta.json").read_text())["backbone"]["kind"] == "aligned"
                          and json.loads((p / "meta.json").read_text())["split"] == "val") / "features.npy")
    featurizer, _, _ = load_featurizer(out / "align" / "aligned")
    x = torch.stack([ds[i]["image"] for i in range(2)])
    from prismatic_locality.probe.backbone import BackboneConfig, load_backbone
    with torch.no_grad():
        want = featurizer(load_backbone(BackboneConfig(name=str(out / "align" / "aligned"))).normalize(x))
    assert want.shape[1] == 37
    torch.testing.assert_close(torch.from_numpy(cached[:2].astype(np.float32)), want, atol=1e-2, rtol=1e-2)

    # the separate entry on the finished directory: same numbers (seeded), other keys unchanged
    before = {k: v for k, v in res.items() if k not in ("vlm", "timing_s")}
    (out / "vlm.png").unlink()
    assert vlm_args.main(["--demo-dir", str(out), "--threads", "1"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("vlm", "timing_s")} == before
    assert again["vlm"]["accuracy_per_seed"] == vlm["accuracy_per_seed"]
    assert (out / "vlm.png").is_file() and "## VLM miniature" in (out / "report.md").read_text()


def test_demo_vlm_on_a_directory_that_is_not_a_demo_is_one_line(tmp_path, capsys):
    from prismatic_locality.demo import vlm_args

    assert vlm_args.main(["--demo-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json not found" in err[0] and str(tmp_path) in err[0]
    (tmp_path / "results.json").write_text("{not json")
    assert vlm_args.main(["--demo-dir", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_without_transformers_the_vlm_stage_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    from prismatic_locality.demo import run as D
    from prismatic_locality.demo import vlm_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert D.main(["--quick", "--vlm", "--out", str(tmp_path / "demo")]) == 2
    assert not (tmp_path / "demo" / "scenes").exists()   # before any stage ran
    assert vlm_args.main(["--demo-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("pip install 'prismatic-locality[vlm]'" in line for line in err)
