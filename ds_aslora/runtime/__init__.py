"""The DeepSpeed layer: the distributed shape of an adapter job.

``engine`` (initialize: per-layer adapters in the ZeRO engine, shared tensors replicated),
``replicated_bank`` and ``bank_optim`` (the shared tensors, all-reduced once per step, and their
optimizer), ``zero3_gather`` (one post-step all-gather per dtype), ``ds_config`` (filling a
DeepSpeed JSON's ``"auto"`` values), ``step`` (one micro-step in the exact order),
``checkpoint`` (engine, bank and merge state saved and resumed together), ``comm_audit``
(collectives counted by caller) and ``base_model`` (loading the frozen model partitioned).

May import: ``export`` (a checkpoint holds a compact adapter copy), ``merging``, ``adapters``,
``utils``. Not ``planning`` or ``train``.
"""
