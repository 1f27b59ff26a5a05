"""Component shapes on tiny configs, and pipeline layers chained in one process == the plain model."""

from __future__ import annotations

import pytest
import torch

from lavis.config.schema import Config
from lavis.data.tokenizer import load_tokenizer
from lavis.model.eva_vit import build_eva_vit, vit_features
from lavis.model.llm import decoder_parts, llm_hf_config
from lavis.model.mllm import MultimodalLM, lm_loss, merge_media
from lavis.model.qformer import build_qformer, build_query_tokens, qformer_queries
from lavis.pipeline.layers import DecoderBlockPipe, FinalNormPipe, LMHeadPipe, VisionEmbedPipe
from lavis.pipeline.plan import layer_table, layers_to_plain


@pytest.fixture(scope="module")
def setup(tiny_cfg: Config):
    tok = load_tokenizer(tiny_cfg.model.llm.tokenizer)
    ph = tok.token_id(tiny_cfg.model.llm.image_placeholder)
    return tiny_cfg.model, llm_hf_config(tiny_cfg.model.llm), ph


def test_vit_and_qformer_shapes(setup) -> None:
    m, _, _ = setup
    vit = build_eva_vit(m.vision)
    feats = vit_features(vit, torch.randn(3, 3, m.vision.image_size, m.vision.image_size))
    n_patches = (m.vision.image_size // m.vision.patch_size) ** 2
    assert feats.shape == (3, 1 + n_patches, m.vision.width)
    # LAVIS layout: fused qkv without bias, q/v biases, no K bias; no final norm.
    keys = set(vit.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= keys
    assert "blocks.0.attn.qkv.bias" not in keys and not any(k.startswith("norm.") for k in keys)
    qf = build_qformer(m.qformer, m.vision.width)
    q = qformer_queries(qf, build_query_tokens(m.qformer), feats)
    assert q.shape == (3, m.qformer.num_query_tokens, m.qformer.hidden_size)
    cross = {k.split(".")[2] for k in qf.state_dict() if "crossattention" in k}
    assert cross == {str(i) for i in range(0, m.qformer.num_layers, m.qformer.cross_attention_freq)}


def test_plain_model_logits_shape_and_merge_check(setup) -> None:
    m, hf, ph = setup
    model = MultimodalLM(m, ph)
    model.init_weights(0)
    ids = torch.randint(10, 400, (2, 20))
    ids[0, 2:2 + m.qformer.num_query_tokens] = ph
    logits = model(torch.randn(1, 3, 64, 64), ids, torch.ones_like(ids))
    assert logits.shape == (2, 20, hf.vocab_size)
    with pytest.raises(ValueError, match="placeholder"):
        model(torch.randn(2, 3, 64, 64), ids, torch.ones_like(ids))  # two images, one placeholder run


def test_merge_media_writes_rows_in_order() -> None:
    embeds = torch.zeros(2, 5, 3)
    ids = torch.tensor([[9, 7, 7, 9, 9], [7, 7, 9, 9, 9]])
    media = torch.arange(12.0).view(2, 2, 3)
    out = merge_media(embeds, ids, media, placeholder_id=7)
    assert torch.equal(out[0, 1:3], media[0]) and torch.equal(out[1, 0:2], media[1])
    assert out[0, 0].abs().sum() == 0


def _pipe_layers(m, hf, ph):
    parts = decoder_parts(hf)
    s, n, std = m.init_seed, hf.num_hidden_layers, m.init_std
    return ([VisionEmbedPipe(m, hf, ph, s)] + [DecoderBlockPipe(hf, parts, j, s + 1 + j, std) for j in range(n)]
            + [FinalNormPipe(hf, parts, s + 1 + n, std), LMHeadPipe(hf, s + 2 + n, std)])


def test_layer_init_matches_plain_init_and_table_covers_every_key(setup) -> None:
    m, hf, ph = setup
    layers = _pipe_layers(m, hf, ph)
    plain = MultimodalLM(m, ph)
    plain.init_weights(m.init_seed)
    sd = layers_to_plain(layer_table(hf.num_hidden_layers), {i: layer.state_dict() for i, layer in enumerate(layers)})
    ref = plain.state_dict()
    assert set(sd) == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_pipeline_chained_equals_plain_model(setup) -> None:
    m, hf, ph = setup
    layers = _pipe_layers(m, hf, ph)
    plain = MultimodalLM(m, ph)
    plain.init_weights(m.init_seed)
    nq = m.qformer.num_query_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 400, (3, 48), generator=g)
    ids[0, 3:3 + nq] = ph
    ids[2, 5:5 + nq] = ph
    ids[2, 20:20 + nq] = ph
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    mask[2, 40:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    x = (pixels, ids, mask)
    for layer in layers:
        x = layer(x)
    loss_pipe = lm_loss(x, labels)
    loss_plain = plain.loss(pixels, ids, mask, labels)
    torch.testing.assert_close(loss_pipe, loss_plain, rtol=1e-6, atol=1e-6)
    # gradients agree too (projection weight)
    loss_pipe.backward()
    loss_plain.backward()
    torch.testing.assert_close(layers[0].llm_proj.weight.grad, plain.llm_proj.weight.grad, rtol=1e-5, atol=1e-7)


def test_frozen_encoders_stay_in_eval_mode() -> None:
    from lavis.config.load import load_config

    from .conftest import PRETRAIN_CFG

    cfg = load_config(PRETRAIN_CFG)
    tok = load_tokenizer(cfg.model.llm.tokenizer)
    model = MultimodalLM(cfg.model, tok.token_id(cfg.model.llm.image_placeholder)).train()
    assert not model.visual_encoder.training and not model.qformer.training
    assert model.llm_proj.training and model.llm_model.training
    model.apply_trainable()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"llm_proj"}


def test_checkpointed_decoder_block_gives_same_output_and_gradients(tiny_cfg: Config) -> None:
    hf = llm_hf_config(tiny_cfg.model.llm)
    parts = decoder_parts(hf)
    plain = DecoderBlockPipe(hf, parts, 0, seed=3, std=0.05)
    ckpt = DecoderBlockPipe(hf, parts, 0, seed=3, std=0.05, recompute=True)
    x = torch.randn(2, 12, hf.hidden_size, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    outs, grads = [], []
    for block in (plain, ckpt):
        x.grad = None
        out = block((x, mask))[0]
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append((x.grad.clone(), block.layer.mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
