"""The adapter math, with no DeepSpeed in it: what a LoRA, ShareLoRA or ASLoRA model is.

``config`` (AdapterConfig), ``bank`` (SharedBank, the one owner of every shared tensor),
``layers`` (AdapterLinear), ``inject`` (the sharing plan, target matching) and ``count``
(exact trainable-parameter counts). Everything here is an ordinary torch module, so a plain
torch optimizer trains it; the rooms above only decide where its tensors live.

May import: ``utils``. Never imports ``deepspeed`` (checked by import-linter).
"""
