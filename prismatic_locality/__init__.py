"""prismatic-locality: locality alignment (MaskEmbed) for vision transformers.

align (MaskEmbed trainer) -> probe (patch-level probing) -> Prismatic plugin (VLMs).
The core never imports Prismatic; only `prismatic_locality.prismatic` does.

Importing the package registers the aligned architectures with timm (``<timm ViT>_softcap``, tag
``maskembed``; see `prismatic_locality.hub`). It does so as soon as timm is imported, not before: the
``locality`` command must start without importing torch, and most of its usage errors are instant.
"""
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def _register_with_timm() -> None:
    try:
        from . import hub

        hub.register()
    except Exception as e:  # never let a registration problem break `import timm`
        warnings.warn(f"prismatic_locality: aligned architectures not registered with timm ({e})")


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when timm is imported, it lets the normal finders locate it and runs
    `_register_with_timm` right after timm's module has executed. It stays in place until then, as
    ``importlib.util.find_spec("timm")`` (transformers' availability check) asks without importing."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "timm" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register_with_timm()

            spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())
