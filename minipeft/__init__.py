"""minipeft: parameter-efficient fine-tuning, built from scratch for a course.

    from minipeft import Encoder, add_adapter, train_adapter, LoRAConfig
    model = Encoder.from_pretrained()                      # MiniLM, offline
    add_adapter(model, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "task")
    train_adapter(model, "task")                           # only the adapter trains
"""
from . import methods  # noqa: F401  (registers every method's config)
from .api import (activate, add_adapter, adapter_names, deactivate, delete_adapter, for_inference,  # noqa: F401
                  load_adapter, parameter_summary, save_adapter, set_active, train_adapter)
from .backbones.contract import per_example  # noqa: F401
from .backbones.encoder import Encoder, EncoderConfig  # noqa: F401
from .generation import Generation, generate  # noqa: F401
from .interop import TransformersBackbone, export_peft, import_peft  # noqa: F401
from .methods.bottleneck import BottleneckConfig  # noqa: F401
from .methods.compacter import CompacterConfig, CompacterPPConfig, PHMAdapterConfig  # noqa: F401
from .methods.fusion import FusionConfig, freeze_adapters, fusion_attention, fusion_regularization  # noqa: F401
from .methods.lora import LoRAConfig, merge_adapter, merge_and_unload, unmerge_adapter  # noqa: F401
from .methods.parallel import ParallelAdapterConfig, ScaledParallelAdapterConfig  # noqa: F401
from .methods.prefix import PrefixConfig, eject_prefix  # noqa: F401

__version__ = "0.1.0"
