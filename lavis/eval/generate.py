"""The one place benchmark answers are generated: :func:`generate_answers`.

Left-padded batched generation on today's :class:`~lavis.chat.engine.ChatEngine`: each sample's prompt is built
exactly as the chat engine builds a one-turn conversation (media markers, template), embedded with its images, and
the batch is padded on the left (zero embeddings, attention mask 0) so that every sequence's last prompt token is
the last position; transformers derives position ids from the mask. Each sequence stops at its own end token (the
engine's stop ids); its text is cut there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from lavis.chat.engine import ChatEngine, GenerationSettings
from lavis.data.conversation import encode_prompt
from lavis.eval.common import Sample


def _embed(engine: ChatEngine, sample: Sample) -> torch.Tensor:
    """``[L, D]`` prompt embeddings of one sample (images/video encoded and merged)."""
    turn = engine.make_turn(sample.query, [engine.load_media(p, video=sample.video) for p in sample.media])
    ids = encode_prompt([(turn.query, None)], engine.tpl)
    model = engine.model
    vision_dev = model.visual_encoder.patch_embed.proj.weight.device
    embed_dev = model.llm_model.get_input_embeddings().weight.device
    pixels = turn.pixels if turn.pixels is not None else torch.zeros(0, 3, 1, 1)
    return model.embed(pixels.to(vision_dev), torch.tensor([ids], device=embed_dev))[0]


@torch.inference_mode()
def _generate_batch(engine: ChatEngine, samples: Sequence[Sample], settings: GenerationSettings) -> list[str]:
    embeds = [_embed(engine, s) for s in samples]
    longest = max(e.shape[0] for e in embeds)
    dim, dev, dtype = embeds[0].shape[1], embeds[0].device, embeds[0].dtype
    batch = torch.zeros(len(embeds), longest, dim, device=dev, dtype=dtype)
    mask = torch.zeros(len(embeds), longest, device=dev, dtype=torch.long)
    for i, e in enumerate(embeds):
        batch[i, longest - e.shape[0]:] = e
        mask[i, longest - e.shape[0]:] = 1
    s = settings
    gen = GenerationConfig(
        max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens or None, do_sample=s.do_sample,
        num_beams=s.num_beams, temperature=s.temperature if s.do_sample else None,
        top_p=s.top_p if s.do_sample else None, top_k=None, repetition_penalty=s.repetition_penalty,
        eos_token_id=engine.stop_ids, pad_token_id=engine.pad_id,
    )
    out = engine.model.llm_model.generate(inputs_embeds=batch, attention_mask=mask, generation_config=gen)
    texts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in engine.stop_ids), len(row))
        texts.append(engine.tpl.tokenizer.decode(row[:cut]).strip())
    return texts


def generate_answers(
    model_ctx: ChatEngine, samples: Sequence[Sample], settings: GenerationSettings, batch_size: int
) -> list[str]:
    """One answer per sample, in order, generated ``batch_size`` at a time (greedy unless ``settings`` say)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        answers += _generate_batch(model_ctx, samples[i:i + batch_size], settings)
    return answers
