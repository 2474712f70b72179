"""Adapters out of the job: ``adapter`` (a plain peft LoRA directory and the compact format with
shared tensors once) and ``merged`` (offline, on CPU: peft from compact, and a merged Hugging Face
model written one base shard at a time); ``cli`` is the ``ds-aslora-export`` command (``launch/export.py``
from a checkout).

May import: ``merging`` (fp32 masters under ZeRO), ``adapters``, ``utils``. Not ``runtime``,
``planning`` or ``train``.
"""
