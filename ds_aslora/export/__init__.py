"""Adapters out of the job: ``adapter`` (a plain peft LoRA directory and the compact format with
shared tensors once) and ``merged`` (offline, on CPU: peft from compact, and a merged Hugging Face
model written one base shard at a time).

May import: ``merging`` (fp32 masters under ZeRO), ``adapters``, ``utils``. Not ``runtime``,
``planning`` or ``train``.
"""
