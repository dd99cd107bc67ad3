"""minipeft: parameter-efficient fine-tuning, built from scratch for a course."""
from . import methods  # noqa: F401  (registers every method's config)
from .api import (activate, add_adapter, adapter_names, deactivate, delete_adapter, load_adapter,  # noqa: F401
                  parameter_summary, save_adapter, set_active, train_adapter)
from .backbones.encoder import Encoder, EncoderConfig  # noqa: F401
from .methods import BottleneckConfig  # noqa: F401

__version__ = "0.1.0"
