"""MiniGPT-4's LLaMA-2 model (``--model-type minigpt4_llama2``): no Q-Former, 4 concatenated ViT patch tokens per
image token into ``llm_proj``; its checkpoint loads with every key accounted for, and the chat prompt is MiniGPT-4's
demo prompt token for token (LLaMA's real sentencepiece model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lavis.config.load import ConfigError, load_config
from lavis.config.presets import preset_path
from lavis.config.schema import LLMConfig, ModelConfig, QFormerConfig, VisionConfig
from lavis.data.cache_features import cache_level
from lavis.model.eva_vit import vit_features
from lavis.model.llm import decoder_parts, llm_hf_config
from lavis.model.mllm import MultimodalLM, lm_loss
from lavis.pipeline.layers import DecoderBlockPipe, FinalNormPipe, LMHeadPipe, VisionEmbedPipe
from lavis.pipeline.plan import Workload, layer_costs, layer_table, layers_to_plain
from lavis.testing.synthetic import write_minigpt4
from lavis.weights.checkpoint import read_checkpoint

LLAMA_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "llama_tokenizer.model"
PH = 0  # <unk>, the preset's image placeholder
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 500}


def tiny(image_size: int = 224) -> ModelConfig:
    """The preset's layout at a tiny width: ViT-g's 14 px patches, no Q-Former, 4 patches per image token."""
    return ModelConfig(
        vision=VisionConfig(image_size=image_size, patch_size=14, width=32, depth=1, num_heads=4, mlp_hidden=64),
        qformer=QFormerConfig(enabled=False, patch_concat=4),
        llm=LLMConfig(hf_config=TINY_LLAMA, template="minigpt4_llama2", image_placeholder="<unk>"),
    )


def test_preset_is_minigpt4_llama2_geometry() -> None:
    m = load_config(preset_path("minigpt4_llama2")).model
    assert not m.qformer.enabled and m.qformer.checkpoint is None
    assert (m.num_image_tokens, m.projection_in_dim) == (64, 5632)  # 256 ViT-g patches / 4, 4 x 1408
    assert cache_level(m) == "vision"  # a feature cache holds ln_vision features; layer 0 concatenates them
    with pytest.raises(ConfigError, match=r"model\.qformer\.checkpoint must be null"):
        load_config(preset_path("minigpt4_llama2"), ["model.qformer.checkpoint=blip2.pth"])
    with pytest.raises(ConfigError, match=r"model\.qformer\.patch_concat \(3\) must divide the ViT's 256"):
        load_config(preset_path("minigpt4_llama2"), ["model.qformer.patch_concat=3"])


def test_image_becomes_64_tokens_as_minigpt4_encode_img() -> None:
    m = tiny()
    model = MultimodalLM(m, PH)
    model.init_weights(0)
    assert model.qformer is None and model.query_tokens is None
    assert not any(k.startswith(("qformer.", "query_tokens")) for k in model.state_dict())
    assert tuple(model.llm_proj.weight.shape) == (64, 4 * 32)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model.embed(pixels, torch.full((1, 128), PH))[0].view(2, 64, 64)
        # MiniGPT-4 encode_img with has_qformer False: ln_vision(vit), drop cls, view(bs, pn / 4, hs * 4), llama_proj
        feats = model.ln_vision(vit_features(model.visual_encoder, pixels))[:, 1:, :]
        bs, pn, hs = feats.shape
        ref = model.llm_proj(feats.view(bs, pn // 4, hs * 4))
    assert (bs, pn, hs) == (2, 256, 32)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="128 image placeholder tokens in the batch but 64 image embeddings"):
        model.embed(pixels[:1], torch.full((1, 128), PH))


def _pipe_layers(m: ModelConfig):
    hf = llm_hf_config(m.llm)
    parts = decoder_parts(hf)
    s, n, std = m.init_seed, hf.num_hidden_layers, m.init_std
    return ([VisionEmbedPipe(m, hf, PH, s)] + [DecoderBlockPipe(hf, parts, j, s + 1 + j, std) for j in range(n)]
            + [FinalNormPipe(hf, parts, s + 1 + n, std), LMHeadPipe(hf, s + 2 + n, std)])


def test_pipeline_layers_chained_equal_the_plain_model() -> None:
    m = tiny(image_size=56)  # 16 patches -> 4 image tokens
    assert m.num_image_tokens == 4
    layers = _pipe_layers(m)
    plain = MultimodalLM(m, PH)
    plain.init_weights(m.init_seed)
    sd = layers_to_plain(layer_table(2), {i: layer.state_dict() for i, layer in enumerate(layers)})
    assert set(sd) == set(plain.state_dict()) and all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (2, 24), generator=g)
    ids[0, 3:7] = PH
    ids[1, 2:6] = PH
    ids[1, 10:14] = PH
    mask = torch.ones_like(ids)
    mask[0, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.randn(3, 3, 56, 56, generator=g)
    x = (pixels, ids, mask)
    for layer in layers:
        x = layer(x)
    loss_pipe, loss_plain = lm_loss(x, labels), plain.loss(pixels, ids, mask, labels)
    torch.testing.assert_close(loss_pipe, loss_plain, rtol=1e-6, atol=1e-6)
    loss_pipe.backward()
    loss_plain.backward()
    torch.testing.assert_close(layers[0].llm_proj.weight.grad, plain.llm_proj.weight.grad, rtol=1e-5, atol=1e-7)


def test_planner_counts_layer0_parameters_without_qformer_exactly() -> None:
    m = tiny()
    hf = llm_hf_config(m.llm)
    dims = {k: getattr(hf, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size")}
    costs = layer_costs(m, dims, Workload(tokens=256, seq_len=128, images=2))
    model = MultimodalLM(m, PH)
    model.apply_trainable()
    embed = [p for n, p in model.named_parameters() if not n.startswith("llm_model.model.layers.")
             and not n.startswith(("llm_model.model.norm", "llm_model.lm_head"))]
    # layer 0 exactly (the block estimate adds q/k/v biases LLaMA does not have)
    assert costs[0].params == sum(p.numel() for p in embed)
    assert costs[0].trainable_params == sum(p.numel() for p in embed if p.requires_grad)


def test_minigpt4_saver_checkpoint_loads_every_key(tmp_path: Path) -> None:
    """Its saver's layout: ``{"model": {llama_proj.*, LLaMA inv_freq buffers}, optimizer, config, scaler, epoch}``
    with ``llama_proj`` reading 4 x ViT width; loaded into llm_proj, buffers ignored with the reason, nothing else."""
    from lavis.weights.base import model_shapes

    m = tiny()
    path = write_minigpt4(tmp_path / "pretrained_minigpt4_llama2_7b.pth", 64, m.projection_in_dim, num_layers=2,
                          head_dim=16, has_qformer=False)
    want = model_shapes(m)
    tensors, rep = read_checkpoint(path, want, num_layers=2)
    assert rep.ok and not rep.unexpected and not rep.missing and not rep.mismatched
    assert sorted(rep.loaded) == ["llm_proj.bias", "llm_proj.weight"]
    assert sorted(rep.ignored) == [f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)]
    saved = torch.load(path, weights_only=True)
    assert saved["config"]["model"]["has_qformer"] is False
    assert torch.equal(tensors["llm_proj.weight"], saved["model"]["llama_proj.weight"])
    # the same file on a model with a Q-Former (projection from 64-wide queries) is refused by shape
    with_qf = ModelConfig(vision=m.vision, qformer=QFormerConfig(hidden_size=48, num_layers=1, num_heads=4,
                                                                 intermediate_size=96), llm=m.llm)
    _, bad = read_checkpoint(path, model_shapes(with_qf), num_layers=2)
    assert not bad.ok and [x.key for x in bad.mismatched] == ["llm_proj.weight"]


@pytest.mark.skipif(not LLAMA_MODEL.is_file(), reason=f"LLaMA tokenizer not found at {LLAMA_MODEL}")
def test_chat_prompt_is_minigpt4_demo_token_for_token() -> None:
    """MiniGPT-4's demo (CONV_VISION_LLama2): system + '<s>[INST] ' + '<Img><ImageHere></Img>' + ' ' + question +
    ' [/INST] ', split at <ImageHere>, each side tokenised on its own (BOS on the first only; the slow LLaMA
    tokenizer turns '<s>' text into id 1), 64 image embeddings between."""
    import sentencepiece as spm

    from lavis.chat.engine import ChatEngine, Media
    from lavis.data.conversation import IMAGE_MARKER, template_from_config
    from lavis.data.tokenizer import load_tokenizer

    cfg = load_config(preset_path("minigpt4_llama2"))
    tpl = template_from_config(load_tokenizer(str(LLAMA_MODEL)), cfg)
    assert tpl.num_query == 64
    engine = ChatEngine(MultimodalLM(tiny(), PH), tpl, 224, torch.device("cpu"))
    turn = engine.make_turn("What is this?", [Media(IMAGE_MARKER, torch.zeros(1, 3, 224, 224), "cat.png")])
    ours = engine.encode([turn])

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA_MODEL))
    system = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
              "it to you. Please answer my questions.")
    prompt = system + "<s>[INST] " + "<Img><ImageHere></Img>" + " " + "What is this?" + " [/INST] "
    before, after = prompt.split("<ImageHere>")
    sys_text, inst = before.split("<s>")
    demo = [sp.bos_id(), *sp.encode(sys_text), sp.piece_to_id("<s>"), *sp.encode(inst), *[0] * 64, *sp.encode(after)]
    assert ours == demo


@pytest.mark.process
def test_pipeline_training_without_qformer(tiny_data: Path, tmp_path: Path) -> None:
    """Two pipeline stages on the demo model without a Q-Former: the data carries 64 / 8^2 / 4 = 16 placeholders per
    image (the template follows the config), only the projection (4 x 128 -> 128) trains and is saved."""
    import math

    from lavis.convert.pipe_to_pth import load_plain_state, resolve_tag_dir

    from .conftest import PRETRAIN_CFG, losses, train

    run = train(tmp_path, "noqf", 2, 2, gas=2, data=tiny_data, steps=3, cfg=PRETRAIN_CFG,
                extra=("model.qformer.enabled=false",))
    got = losses(run)
    assert len(got) == 3 and all(math.isfinite(x) for x in got) and got[-1] < got[0]
    state, _ = load_plain_state(resolve_tag_dir(run))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"llm_proj.weight": (128, 512), "llm_proj.bias": (128,)}


@pytest.mark.skipif(not LLAMA_MODEL.is_file(), reason=f"LLaMA tokenizer not found at {LLAMA_MODEL}")
@pytest.mark.parametrize(("tail", "stop"), [("###Human: more", [2277, 29937]), (" ### Human: more", [835]),
                                            ("</s>", [2])])
def test_chat_stops_at_minigpt4s_stop_words_and_never_streams_them(tail: str, stop: list[int]) -> None:
    """MiniGPT-4's demo ends LLaMA-2 answers at '###' (stop_words_ids [835] and [2277, 29937]) or </s>: generation is
    told to stop on the token that completes one, and no streamed piece ever shows a '#' of it."""
    from lavis.chat.engine import Request, _Row, _RowsDone
    from lavis.data.conversation import template_from_config
    from lavis.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(LLAMA_MODEL))
    tpl = template_from_config(tok, load_config(preset_path("minigpt4_llama2")))
    text = "A red circle on a white background."
    answer = tok.encode(text)
    generated = tok.encode(text + tail)
    assert generated[:len(answer) + len(stop)] == answer + stop  # the ids the demo's criteria look for
    pieces: list[str] = []
    row = _Row(tpl.tokenizer.decode, tpl.cut_answer, tpl.spec.stop_texts, tpl.stop_sequences(),
               Request([], on_text=pieces.append), 100, stream=True)
    done = _RowsDone([row], num_beams=1)
    stopped_at = next(n for n in range(1, len(generated) + 1)  # generate() asks after each new token
                      if bool(done(torch.tensor([generated[:n]]), None)[0]))
    assert stopped_at == len(answer) + len(stop)
    assert "".join(pieces) == text and not any("#" in p for p in pieces)
    got = row.answer(10)
    assert (got.text, got.finish_reason, got.completion_tokens) == (text, "stop", len(answer))
