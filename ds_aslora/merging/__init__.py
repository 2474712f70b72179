"""ASLoRA's adaptive B merging, from the pure decision to the cross-rank rewrite.

``policy`` (MergePolicy: which groups merge, from running means; no model tensors),
``merger`` (LocalMerger: the single-process reference on a plain torch optimizer),
``sharded_distance`` (exact distances from per-rank flat slices), ``zero_state`` (where a B's
fp32 value and Adam moments live under ZeRO 0-3) and ``coordinator`` (MergeCoordinator: every
rank agrees on each merge and rewrites the optimizer state of merged groups).

May import: ``adapters``, ``utils``. ``policy``, ``merger`` and ``sharded_distance`` never
import ``deepspeed`` (checked by import-linter).
"""
