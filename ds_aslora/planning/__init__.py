"""Planning without weights: per-GPU memory of a run under ZeRO 0-3, from a model on the meta device.

``inventory`` (every tensor of the adapted model and what ZeRO-3 keeps resident),
``activations`` (saved activations per decoder layer) and ``memory`` (the plan, checked against
DeepSpeed's own estimators). ``cli`` prints it (``ds-aslora-plan``; ``launch/plan.py`` from a checkout).

May import: ``merging`` (ASLoRA's schedule), ``adapters``, ``utils``. Not ``runtime``, ``export`` or
``train``.
"""
