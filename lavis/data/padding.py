"""Padding efficiency (real tokens / padded token slots) of dynamic vs fixed-length padding.

    python -m lavis.data.padding [--tokenizer ../shared/data/qwen.tiktoken] [--samples 20000]

measures it on a synthetic LLaVA-Instruct-150k-like set: the three published categories in their published
proportions (LLaVA paper, sec. 3: 58K conversations, 23K detailed descriptions, 77K complex reasoning), rendered with
the real ChatML template (32 image placeholders per image, MPP's system prompt) and tokenised with the given
tokenizer. The word counts per turn are this module's assumptions (``CATEGORIES``), not published statistics; the
text is random English-like words, so the token/word ratio is the tokenizer's real one for such text.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence

import numpy as np

from lavis.data.collate import Collator
from lavis.data.conversation import SYSTEM_PROMPTS, ChatTemplate, encode_conversation
from lavis.data.datasets import StepSampler
from lavis.data.tokenizer import load_tokenizer


def padded_length(lengths: Sequence[int], pad_to_multiple_of: int, fixed_length: int | None) -> int:
    """The length the training collator pads this micro-batch to (``Collator.padded_length``): ``fixed_length``,
    or the longest sample rounded up to the multiple (uncapped here: the lengths are the already-fitted ones)."""
    collator = Collator(pad_id=0, max_txt_len=fixed_length if fixed_length is not None else sys.maxsize,
                        pad_to_multiple_of=pad_to_multiple_of, fixed_length=fixed_length is not None)
    return collator.padded_length(max(lengths))


def padding_efficiency(lengths_per_microbatch: list[list[int]], pad_to_multiple_of: int,
                       fixed_length: int | None) -> float:
    """Real tokens / padded token slots over the micro-batches (1.0 = no padding)."""
    real = sum(sum(mb) for mb in lengths_per_microbatch)
    padded = sum(len(mb) * padded_length(mb, pad_to_multiple_of, fixed_length) for mb in lengths_per_microbatch if mb)
    return real / padded if padded else 1.0


def microbatches(lengths: Sequence[int], *, micro_batch_size: int, grad_accum_steps: int, dp_size: int, steps: int,
                 seed: int = 0, group_by_length: bool) -> list[list[int]]:
    """Token lengths of every micro-batch of ``steps`` optimizer steps, cut by the training sampler."""
    kw = {"seed": seed, "micro_batch_size": micro_batch_size, "grad_accum_steps": grad_accum_steps, "dp_size": dp_size,
              "length_of": (lambda i: lengths[i]) if group_by_length else None}
    sampler = StepSampler([len(lengths)], [1.0], dp_rank=0, **kw)
    return [[lengths[i] for i, _ in rank] for s in range(steps) for mb in sampler.step_keys(s) for rank in mb]


# (share, user words range, answer words range, exchanges range) per LLaVA-Instruct category; shares from the paper.
CATEGORIES = {
    "conversation": (58, (6, 16), (15, 90), (2, 6)),
    "detail": (23, (6, 12), (80, 200), (1, 1)),
    "complex_reasoning": (77, (10, 30), (60, 180), (1, 1)),
}
_WORDS = [
    'the', 'a', 'an', 'image', 'shows', 'person', 'man', 'woman', 'people', 'car', 'street', 'table', 'dog',
    'cat', 'sitting', 'standing', 'next', 'to', 'while', 'in', 'on', 'with', 'of', 'and', 'near', 'background',
    'several', 'large', 'small', 'white', 'black', 'red', 'blue', 'green', 'wearing', 'holding', 'looking',
    'building', 'sign', 'food', 'plate', 'bus', 'train', 'kitchen', 'room', 'window', 'water', 'tree', 'field',
    'sky', 'road', 'because', 'likely', 'might', 'suggests', 'indicates', 'possible', 'scene', 'area', 'group',
    'two', 'three', 'it', 'is', 'are', 'has', 'there', 'this', 'that', 'which', 'where', 'what', 'why', 'how',
    'could', 'would', 'should', 'their', 'they', 'he', 'she', 'its', 'from', 'into',
]


def synthetic_llava_instruct(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` canonical conversations following ``CATEGORIES`` (one image each, ``<image>`` first)."""
    rng = random.Random(seed)
    names = list(CATEGORIES)
    weights = [CATEGORIES[k][0] for k in names]

    def words(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*lo_hi))).capitalize() + "."

    out = []
    for _ in range(n):
        _, q, a, ex = CATEGORIES[rng.choices(names, weights)[0]]
        conv = []
        for k in range(rng.randint(*ex)):
            conv += [{"role": "user", "content": ("<image>\n" if k == 0 else "") + words(q)},
                     {"role": "assistant", "content": words(a)}]
        out.append(conv)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="../shared/data/qwen.tiktoken")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum-steps", type=int, default=8)
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--fixed", type=int, default=1536)
    p.add_argument("--multiple", type=int, default=64)
    args = p.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    tpl = ChatTemplate(tok, SYSTEM_PROMPTS["chatml"], "<|extra_0|>", 32, 32)
    lengths = [len(encode_conversation(c, tpl, record_id=str(i)).input_ids)
               for i, c in enumerate(synthetic_llava_instruct(args.samples))]
    q = np.percentile(lengths, [5, 50, 90, 99, 100])
    print(f"{len(lengths)} samples ({tok.source}): mean {np.mean(lengths):.0f}, p5 {q[0]:.0f}, p50 {q[1]:.0f}, "
          f"p90 {q[2]:.0f}, p99 {q[3]:.0f}, max {q[4]:.0f} tokens")
    g = args.micro_batch_size * args.grad_accum_steps * args.dp_size
    steps = len(lengths) // g
    kw = {"micro_batch_size": args.micro_batch_size, "grad_accum_steps": args.grad_accum_steps, "dp_size": args.dp_size,
              "steps": steps}
    plain = microbatches(lengths, group_by_length=False, **kw)
    grouped = microbatches(lengths, group_by_length=True, **kw)
    print(f"micro-batch {args.micro_batch_size} x GAS {args.grad_accum_steps} x DP {args.dp_size}, {steps} steps:")
    print(f"  fixed {args.fixed}:                        {padding_efficiency(plain, 1, args.fixed):.3f}")
    print(f"  dynamic (x{args.multiple}):                      {padding_efficiency(plain, args.multiple, None):.3f}")
    print(f"  dynamic (x{args.multiple}) + group_by_length:    {padding_efficiency(grouped, args.multiple, None):.3f}")


if __name__ == "__main__":
    from lavis.cli import run_cli

    run_cli(main)
