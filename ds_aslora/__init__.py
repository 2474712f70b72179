"""ds-aslora: cross-layer shared low-rank adaptation (LoRA, ShareLoRA, ASLoRA) for DeepSpeed."""
from .adapters.config import AdapterConfig
from .adapters.count import count_after_merges, count_trainable
from .adapters.inject import adapter_layers, inject_adapters
from .export.adapter import export_compact, export_peft, load_compact
from .merging.merger import LocalMerger
from .merging.policy import Merge, MergePolicy

__all__ = ["AdapterConfig", "inject_adapters", "adapter_layers", "count_trainable",
           "count_after_merges", "export_peft", "export_compact", "load_compact",
           "MergePolicy", "Merge", "LocalMerger"]
__version__ = "0.1.0"
