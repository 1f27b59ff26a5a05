"""Native-resolution VLMs from their published transformers directories (Qwen2.5-VL, Qwen3-VL) under the pipeline."""
