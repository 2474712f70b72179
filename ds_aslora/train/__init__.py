"""The fine-tuning job (``launch/train.py``): run configuration, data, the loop, logging, assets.

``run_config`` (the flags and YAML keys), ``resolved`` (the run settled against the DeepSpeed JSON
and the world size), ``data`` and ``batches`` (tokenised rows, global batches), ``model_setup``,
``loop``, ``best`` (the best checkpoint, early stopping), ``exports`` (tokenizer, best adapter, vLLM
command), ``run_log`` (where metrics go: TensorBoard, DeepSpeed's monitors, ``trainer_log.jsonl``),
``heatmap`` (ASLoRA's distance heatmap), ``assets`` (the embedded default model and text) and
``job`` (the whole run, start to end). The top room: nothing in ``ds_aslora`` imports it.

May import: every other room.
"""
