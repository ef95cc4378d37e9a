"""Patch-level probing benchmark (paper §4.1, App. B): local and global macro recall of a frozen ViT.

labels (targets) -> datasets (COCO-Stuff / ADE20k / demo readers) -> backbone -> features (on-disk
cache) -> heads + train (fit on cached features) -> metrics -> plots; run (`locality probe`, `run_probe`)
and compare (`locality probe-compare`). See docs/probe.md.
"""
