"""ds-aslora: cross-layer shared low-rank adaptation (LoRA, ShareLoRA, ASLoRA) for DeepSpeed."""
from .config import AdapterConfig
from .count import count_after_merges, count_trainable
from .export import export_compact, export_peft, load_compact
from .inject import adapter_layers, inject_adapters
from .merge_policy import Merge, MergePolicy
from .merger import LocalMerger

__all__ = ["AdapterConfig", "inject_adapters", "adapter_layers", "count_trainable",
           "count_after_merges", "export_peft", "export_compact", "load_compact",
           "MergePolicy", "Merge", "LocalMerger"]
__version__ = "0.1.0"
