"""Native-resolution VLMs from their published transformers directories (Qwen2.5-VL, Qwen3-VL) under the pipeline.

- ``config``: the ``model.vlm`` section (which directory, what is frozen, tiny from-scratch overrides).
- ``arch``: which transformers classes build each piece of a family (the modules are transformers' own).
- ``weights``: a directory's tensors, every one accounted for; one stage reads only its own layers' tensors.
- ``layers``: the pipeline's layer list (vision tower entries, merger + embeddings, decoder blocks, norm, head), its
  layer table and the inter-stage tuple.
- ``data_config``, ``conversation``, ``processor``, ``processor_files``, ``collate``, ``data``: the data side (the
  model's own processor and chat template, labels on assistant turns, pixel budgets, dynamic-shape micro-batches).
- ``costs``: per-layer parameter / FLOP / activation estimates for ``lavis.pipeline.plan``'s boundary search.
- ``family``: ``VLMFamily``, these pieces as a model family (``lavis.families.FAMILIES``), and the one list of the
  options it does not support yet.
"""
