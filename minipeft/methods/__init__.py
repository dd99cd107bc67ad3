"""One file per method. Importing this package imports each of them, which registers its config with the
core API (``minipeft.api.METHODS``), so ``load_adapter`` can rebuild any saved adapter."""
import importlib
import pkgutil

from .bottleneck import BottleneckConfig  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
