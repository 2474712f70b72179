"""The training job (``launch/train.py``): run configuration, data, and the loop's parts."""
