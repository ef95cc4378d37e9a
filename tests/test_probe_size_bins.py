"""Recall by object size: the paper's Fig. 8 binning as an option next to the default quantile bins."""
import csv
import json
import math

import numpy as np
import pytest

from prismatic_locality.probe.run import run_probe

from test_probe_e2e import tiny_cfg, write_demo


def test_fig8_bins_are_equal_width_patch_fractions_pooled_with_class_0():
    from prismatic_locality.probe.metrics import fig8_size_recall

    # 3 images x 3 classes (class 0 counts), 8 patches per image, 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]
    pos = np.array([[3, 1, 2], [1, 4, 0], [2, 2, 8]])
    tp = np.array([[1, 0, 2], [0, 4, 0], [2, 1, 6]])
    bins = fig8_size_recall(pos, tp, num_patches=8, num_bins=4)
    assert [b["objects"] for b in bins] == [5, 2, 0, 1]  # 2/8 sits on an edge: the lower bin, as torch.bucketize
    assert [b["positives"] for b in bins] == [8, 7, 0, 8]
    assert bins[0]["recall"] == pytest.approx(5 / 8) and bins[1]["recall"] == pytest.approx(5 / 7)
    assert math.isnan(bins[2]["recall"]) and bins[3]["recall"] == pytest.approx(6 / 8)
    assert (bins[1]["size_lo"], bins[1]["size_hi"]) == (0.25, 0.5) and bins[0]["binning"] == "fig8"


def test_probe_records_the_chosen_binning(tmp_path):
    root = write_demo(tmp_path / "scenes", n_train=8, n_val=4)
    cfg = tiny_cfg(root, "demo", tmp_path, task="local", size_bins=4, size_binning="fig8", figure_images=0)
    r = run_probe(cfg)
    bins = r["local"]["size_bins"]
    assert r["config"]["size_binning"] == "fig8" and [b["size_hi"] for b in bins] == [0.25, 0.5, 0.75, 1.0]
    pooled = sum(b["recall"] * b["positives"] for b in bins if b["positives"])
    assert pooled / sum(b["positives"] for b in bins) == pytest.approx(
        sum(np.array(r["local"]["per_class_recall"], dtype=float)[np.array(r["local"]["val_positives"]) > 0]
            * np.array(r["local"]["val_positives"])[np.array(r["local"]["val_positives"]) > 0]) / sum(r["local"]["val_positives"]))
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "size_recall.csv")))
    assert rows[0]["binning"] == "fig8" and float(rows[-1]["size_hi"]) == 1.0
    assert (out / "size_recall.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["local"]["size_bins"][0]["binning"] == "fig8"
    cfg.size_binning = "log"
    with pytest.raises(ValueError, match="size_binning"):
        run_probe(cfg)


def test_size_plot_names_its_binning_and_refuses_mixed_ones(tmp_path):
    from prismatic_locality.probe import plots
    from prismatic_locality.probe.metrics import fig8_size_recall, size_recall

    pos, tp = np.array([[3, 1], [1, 4]]), np.array([[1, 0], [1, 4]])
    fig8 = fig8_size_recall(pos, tp, num_patches=8, num_bins=2)
    quant = size_recall("quantile", np.array([[0.2, 0.1], [0.1, 0.5]]), pos, tp, 8, num_bins=2)
    assert plots.plot_size_recall({"a": fig8, "b": fig8}, tmp_path / "a.png").stat().st_size > 0
    with pytest.raises(ValueError, match="different binnings"):
        plots.plot_size_recall({"a": fig8, "b": quant}, tmp_path / "b.png")
