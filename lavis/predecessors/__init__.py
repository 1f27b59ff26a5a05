"""Compatibility with the predecessors (MPP-Qwen-Next / MiniGPT4Qwen, MiniGPT-4): ``keys.py`` (every predecessor
config key and flag: its translation or refusal), ``migrate.py`` (a predecessor's YAML -> our recipe;
``python -m lavis.config.migrate``), ``checkpoints.py`` (their ``.pth`` checkpoints and layer directories -> our
weight names), ``mpp_layers.py`` (MPP-Qwen layer files -> our checkpoint). Each module sits on the floor of what it
needs (docs/ARCHITECTURE.md, "Layers"): ``keys`` beside config, ``checkpoints`` beside weights, ``migrate`` and
``mpp_layers`` beside convert."""
