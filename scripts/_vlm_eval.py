"""Run one of vlm-evaluation's own scripts, unchanged, with the prismatic_locality plugin registered.

vlm-evaluation's `scripts/evaluate.py` and `scripts/score.py` import nothing of ours, and a run
trained with an aligned backbone or the DecoderProjector only reloads once
`prismatic_locality.prismatic` has registered them (design: prismatic-contract.md §5). So each
wrapper imports the plugin, then executes the upstream file as `__main__` with the same argv.
Every `accelerate launch` worker runs the wrapper, so every process is registered. One import of
vlm-evaluation's is satisfied here too: the LLaVA package, when missing (see `stub_llava_if_missing`).

Where the upstream scripts are: `$VLM_EVAL_ROOT/scripts/` if set (a clone of TRI-ML/vlm-evaluation),
else next to the installed `vlm_eval` package (an editable install; a regular install drops scripts/).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types
from pathlib import Path

ENV = "VLM_EVAL_ROOT"
INSTALL = ("clone https://github.com/TRI-ML/vlm-evaluation and `pip install --no-deps -e <clone>` "
           f"(docs/vlm.md), or set {ENV}=<clone>")


def upstream_script(name: str) -> Path:
    root = os.environ.get(ENV)
    if root:
        script = Path(root).expanduser().resolve() / "scripts" / name
        if not script.is_file():
            raise SystemExit(f"{ENV}={root}: {script} does not exist (expected a clone of TRI-ML/vlm-evaluation)")
        return script
    spec = importlib.util.find_spec("vlm_eval")
    if spec is None or spec.origin is None:
        raise SystemExit(f"vlm-evaluation is not installed: {INSTALL}")
    script = Path(spec.origin).resolve().parents[1] / "scripts" / name
    if not script.is_file():
        raise SystemExit(f"vlm_eval is installed at {Path(spec.origin).parent} but {script} does not exist "
                         f"(not an editable install of TRI-ML/vlm-evaluation?): {INSTALL}")
    return script


# What vlm_eval/models/llava.py imports from LLaVA at module level.
LLAVA_MODULES = ("llava", "llava.constants", "llava.conversation", "llava.mm_utils", "llava.model")


class _NotInstalled:
    """Stands in for a name of the missing LLaVA package; fails, naming it, on first use."""

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise ModuleNotFoundError(f"{self._name}: the LLaVA package is not installed "
                                  "(it is only needed for --model_family llava-v15)")

    __call__ = __getitem__ = __iter__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__"):   # introspection (copy, inspect, hasattr) gets the usual answer
            raise AttributeError(attr)
        self._fail()


def _stub_getattr(mod: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):   # e.g. tools scanning sys.modules for __file__
            raise AttributeError(f"module {mod!r} has no attribute {attr!r}")
        return _NotInstalled(f"{mod}.{attr}")
    return __getattr__


def stub_llava_if_missing() -> None:
    """`vlm_eval.models` imports LLaVA's package (pinned to an old transformers) even to evaluate
    Prismatic models. Without it, register placeholder modules so the import succeeds; any use of
    a LLaVA name then fails with a message saying why. An installed LLaVA is left alone."""
    if "llava" in sys.modules or importlib.util.find_spec("llava") is not None:
        return
    for mod in LLAVA_MODULES:
        m = types.ModuleType(mod)
        m.__spec__ = importlib.machinery.ModuleSpec(mod, None, is_package=True)
        m.__path__ = []     # a package, so the submodule imports resolve to the entries below
        m.__getattr__ = _stub_getattr(mod)
        sys.modules[mod] = m
        if "." in mod:      # `import llava.model` binds the attribute on the parent
            parent, _, child = mod.rpartition(".")
            setattr(sys.modules[parent], child, m)


def run(name: str, loads_models: bool) -> None:
    """`loads_models`: the script builds VLMs (evaluate), so Prismatic must be there; scoring only
    reads the outputs and also runs where Prismatic is not installed."""
    script = upstream_script(name)
    stub_llava_if_missing()
    # Registers the aligned backbones, the DecoderProjector and the model configs (a no-op, with
    # PRISMATIC_AVAILABLE False, when Prismatic is missing: that would only fail later, obscurely).
    plugin = importlib.import_module("prismatic_locality.prismatic")
    if loads_models and not plugin.PRISMATIC_AVAILABLE:
        raise SystemExit("Prismatic is not installed, so aligned models cannot load: install TRI-ML/prismatic-vlms "
                         "from source as docs/vlm.md describes")
    # What `python <clone>/scripts/<name> <args>` would see: its own argv[0] and sys.path[0]. This
    # scripts/ directory leaves sys.path, or its `evaluate.py` would shadow HF's `evaluate` package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if os.environ.get(ENV):     # a bare clone need not be installed: its `vlm_eval` comes first
        sys.path.insert(0, str(script.parents[1]))
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
