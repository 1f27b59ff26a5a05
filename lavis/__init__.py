"""MiniGPT4Qwen-style multimodal LLM trainer on DeepSpeed pipeline parallelism.

Importing the package has no side effects: no registries, no config loading, no weights.
The data flow runs through the sub-packages in this order (imports point backwards only):
config -> data -> model -> pipeline -> engine -> convert -> chat -> serve.
"""

__version__ = "0.1.0"
