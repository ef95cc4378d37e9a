"""The allowed values of every string-valued method setting, defined once (no torch, so the config
and the command line can check them before anything heavy is imported).

Each list is used by the module that implements the choice and by `align.config.validate`.
"""
TARGETS = ("penultimate", "last", "cls")        # maskembed.Teacher: which teacher output is the target
TEACHER_MASKING = ("token", "pixel")            # maskembed.Teacher: how the teacher sees a masked patch
LOSSES = ("mse", "cosine", "l1")                # maskembed.reconstruction_loss
MASK_KINDS = ("uniform", "bernoulli", "block")  # masks.build_mask_sampler
ATTN_IMPLS = ("auto", "flex", "math")           # vit.softcapped_attention: the soft-capped kernel
PRECISIONS = ("auto", "bf16", "fp32")           # precision.resolve
DATA_FORMATS = ("auto", "folder", "wds")        # data.sources.open_source
OBJECTIVES = ("maskembed", "mim", "clipself")   # objectives.py: what `locality align` trains
