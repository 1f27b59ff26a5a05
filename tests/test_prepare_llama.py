"""``python -m lavis.weights.prepare_llama``: Meta-layout shards (real key names, 2 model-parallel shards, tiny dims)
plus a v0-style Vicuna delta (one extra vocabulary row) -> a transformers directory whose logits equal an all-in-RAM
reference; bad deltas, corrupt shards and resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lavis.weights.prepare_llama as prep

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".." / "shared" / "data" / "llama_tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"real LLaMA tokenizer absent: {TOKENIZER}")

DIM, LAYERS, HEADS, KV_HEADS, MULTIPLE_OF, EPS, VOCAB = 64, 2, 4, 2, 32, 1e-6, 32000
HEAD_DIM, FFN = DIM // HEADS, 192  # int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 32
PARAMS = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "multiple_of": MULTIPLE_OF,
          "norm_eps": EPS, "vocab_size": -1}
COL = ("wq", "wk", "wv", "w1", "w3")


def meta_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Meta's names and shapes, written out literally."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=g)

    kv = HEAD_DIM * KV_HEADS
    w = {"tok_embeddings.weight": r(VOCAB, DIM), "norm.weight": 1 + r(DIM), "output.weight": r(VOCAB, DIM),
         "rope.freqs": torch.ones(HEAD_DIM // 2)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        w |= {p + "attention.wq.weight": r(DIM, DIM), p + "attention.wk.weight": r(kv, DIM),
              p + "attention.wv.weight": r(kv, DIM), p + "attention.wo.weight": r(DIM, DIM),
              p + "feed_forward.w1.weight": r(FFN, DIM), p + "feed_forward.w2.weight": r(DIM, FFN),
              p + "feed_forward.w3.weight": r(FFN, DIM), p + "attention_norm.weight": 1 + r(DIM),
              p + "ffn_norm.weight": 1 + r(DIM)}
    return w


def split_axis(name: str) -> int | None:
    """How Meta's model-parallel code splits a tensor over shards (None: replicated)."""
    if name.split(".")[-2] in (*COL, "output"):
        return 0
    if name.split(".")[-2] in ("wo", "w2", "tok_embeddings"):
        return 1
    return None


def write_meta(d: Path, state: dict[str, torch.Tensor], n: int = 2) -> None:
    d.mkdir(parents=True)
    for s in range(n):
        shard = {k: (v if split_axis(k) is None else v.chunk(n, split_axis(k))[s]).clone() for k, v in state.items()}
        torch.save(shard, d / f"consolidated.{s:02d}.pth")
    (d / "params.json").write_text(json.dumps(PARAMS))
    shutil.copyfile(TOKENIZER, d.parent / "tokenizer.model")  # Meta ships it beside the size folders
    lines = [f"{hashlib.md5((d / f).read_bytes()).hexdigest()}  {f}"
             for f in ["params.json", *(f"consolidated.{s:02d}.pth" for s in range(n))]]
    (d / "checklist.chk").write_text("\n".join(lines) + "\n")


def hf_names() -> dict[str, str]:
    m = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
    for i in range(LAYERS):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        m |= {a + "attention.wq.weight": b + "self_attn.q_proj.weight",
              a + "attention.wk.weight": b + "self_attn.k_proj.weight",
              a + "attention.wv.weight": b + "self_attn.v_proj.weight",
              a + "attention.wo.weight": b + "self_attn.o_proj.weight",
              a + "feed_forward.w1.weight": b + "mlp.gate_proj.weight",
              a + "feed_forward.w2.weight": b + "mlp.down_proj.weight",
              a + "feed_forward.w3.weight": b + "mlp.up_proj.weight",
              a + "attention_norm.weight": b + "input_layernorm.weight",
              a + "ffn_norm.weight": b + "post_attention_layernorm.weight"}
    return m


def reference(meta: Path, delta: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The straightforward way: both shards fully in RAM, concatenated, q/k permuted, delta added after resizing."""
    shards = [torch.load(meta / f"consolidated.{s:02d}.pth", weights_only=True) for s in range(2)]

    def permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    out = {}
    for mk, hk in hf_names().items():
        axis = split_axis(mk)
        t = shards[0][mk] if axis is None else torch.cat([s[mk] for s in shards], dim=axis)
        if mk.endswith("wq.weight"):
            t = permute(t, HEADS, DIM, DIM)
        elif mk.endswith("wk.weight"):
            t = permute(t, KV_HEADS, HEAD_DIM * KV_HEADS, DIM)
        out[hk] = t
    if delta is not None:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):  # FastChat: resize, new rows zero
            grown = torch.zeros(delta[k].shape)
            grown[: out[k].shape[0]] = out[k]
            out[k] = grown
        out = {k: v + delta[k] for k, v in out.items()}
    return out


def delta_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A v0-style delta: transformers names, one extra vocabulary row (the [PAD] token)."""
    g = torch.Generator().manual_seed(seed)
    base = meta_state()
    shapes = {hk: tuple(base[mk].shape) for mk, hk in hf_names().items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        shapes[k] = (VOCAB + 1, DIM)
    return {k: 0.05 * torch.randn(*s, generator=g) for k, s in shapes.items()}


def write_delta(d: Path, state: dict[str, torch.Tensor], fmt: str = "bin") -> None:
    d.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
           "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB + 1, "rms_norm_eps": EPS}
    (d / "config.json").write_text(json.dumps(cfg))
    keys = list(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        tensors = {k: state[k].contiguous() for k in part}
        if fmt == "bin":
            name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            if i == 0:  # old transformers saved the rotary buffer
                tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
            torch.save(tensors, d / name)
        else:
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file(tensors, str(d / name))
        weight_map |= dict.fromkeys(tensors, name)
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(TOKENIZER, d / "tokenizer.model")
    (d / "added_tokens.json").write_text(json.dumps({"[PAD]": VOCAB}))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LLaMATokenizer", "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": "<unk>"}))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))


def logits(state_or_dir: dict[str, torch.Tensor] | Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if isinstance(state_or_dir, Path):
        model = AutoModelForCausalLM.from_pretrained(state_or_dir, dtype=torch.float32)
    else:
        vocab = state_or_dir["lm_head.weight"].shape[0]
        cfg = LlamaConfig(hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=EPS,
                          vocab_size=vocab, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state_or_dir, strict=True)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    write_meta(root / "LLaMA" / "7B", meta_state())
    write_delta(root / "vicuna-7b-delta-v0", delta_state())
    out = root / "vicuna-7b-v0"
    assert prep.main(["--meta-dir", str(root / "LLaMA" / "7B"), "--delta", str(root / "vicuna-7b-delta-v0"),
                      "--out", str(out), "--dtype", "fp32"]) == 0
    return {"meta": root / "LLaMA" / "7B", "delta": root / "vicuna-7b-delta-v0", "out": out}


def test_meta_shards_plus_v0_delta_equal_the_all_in_ram_reference(files: dict[str, Path]) -> None:
    from lavis.data.tokenizer import load_tokenizer

    ref = reference(files["meta"], delta_state())
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, VOCAB, 2]])  # includes the delta's [PAD] row
    got, want = logits(files["out"], ids), logits(ref, ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    cfg = json.loads((files["out"] / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]) == (VOCAB + 1, FFN, KV_HEADS)
    tok_cfg = json.loads((files["out"] / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    tok = load_tokenizer(str(files["out"]))  # our reader: tokenizer.model + added_tokens.json
    assert tok.vocab_size == VOCAB + 1 and tok.token_id("[PAD]") == VOCAB
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(files["out"])  # class LlamaTokenizer, as today's transformers names it
    assert (hf_tok.pad_token_id, hf_tok("Hello world").input_ids) == (VOCAB, [1, 15043, 3186])


def test_output_loads_through_the_vicuna_preset(files: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lavis.inspect import main as inspect_main
    from lavis.testing.synthetic import TINY_OPTIONS, write_preset

    written = write_preset("vicuna0_7b", tmp_path, num_layers=1, vision_depth=1, tiny=True)
    shutil.rmtree(written["llm"])
    shutil.copytree(files["out"], written["llm"])
    monkeypatch.chdir(tmp_path)
    assert inspect_main(["--model-type", "vicuna0_7b", "--forward", "--options", *TINY_OPTIONS,
                         "model.vision.depth=1"]) == 0
    out = capsys.readouterr().out
    llm_line = next(ln for ln in out.splitlines() if "vicuna-7b-v0" in ln and " loaded, " in ln)
    assert "0 missing, 0 unexpected" in llm_line and "0 shape-mismatched" in llm_line, out
    assert "finite=True" in out and out.rstrip().endswith("OK")


def test_wrong_shaped_or_missing_delta_tensor_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    bad = delta_state()
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(DIM, FFN)  # transposed
    write_delta(tmp_path / "bad", bad, fmt="safetensors")
    with pytest.raises(prep.PrepareError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[64, 192\] "
                                                r"but the base has \[192, 64\]"):
        prep.prepare(files["meta"], tmp_path / "out1", tmp_path / "bad", dtype="fp32")
    assert not list((tmp_path / "out1").glob("*.safetensors"))  # refused before writing anything
    short = delta_state()
    del short["model.layers.0.self_attn.v_proj.weight"]
    write_delta(tmp_path / "short", short, fmt="safetensors")
    with pytest.raises(prep.PrepareError, match=r"no tensor model\.layers\.0\.self_attn\.v_proj\.weight"):
        prep.prepare(files["meta"], tmp_path / "out1", tmp_path / "short", dtype="fp32")  # nothing written: rerun ok


def test_corrupt_shard_fails_its_checksum(files: dict[str, Path], tmp_path: Path) -> None:
    meta = tmp_path / "LLaMA" / "7B"
    shutil.copytree(files["meta"], meta)
    shard = meta / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(prep.PrepareError, match=r"consolidated\.01\.pth: md5 [0-9a-f]{32} but checklist\.chk says"):
        prep.prepare(meta, tmp_path / "out", dtype="fp32", tokenizer=TOKENIZER)


def test_resume_skips_finished_shards(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = prep.write_shard
    written: list[str] = []

    def failing(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the third shard was built
        real_write(tensors, path)
        written.append(path.name)

    monkeypatch.setattr(prep, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(files["meta"], tmp_path / "out", dtype="fp32")
    first = list(written)
    assert first == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"]
    written.clear()
    monkeypatch.setattr(prep, "write_shard", lambda t, p: (real_write(t, p), written.append(p.name)))
    prep.prepare(files["meta"], tmp_path / "out", dtype="fp32")
    assert written == ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]
    ids = torch.tensor([[1, 450, 4996, 17354, 2]])
    ref = reference(files["meta"], None)
    got, want = logits(tmp_path / "out", ids), logits(ref, ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    with pytest.raises(prep.PrepareError, match="holds shards of a run from other inputs or --dtype"):
        prep.prepare(files["meta"], tmp_path / "out", dtype="fp16")  # never mixes shards of two runs


def test_delta_added_in_row_blocks_equals_resize_then_add() -> None:
    g = torch.Generator().manual_seed(3)
    base, delta = torch.randn(10, 3, generator=g).half(), torch.randn(11, 3, generator=g).half()
    grown = torch.cat([base.float(), torch.zeros(1, 3)])  # FastChat: resized base, new row zero
    want = (grown + delta.float()).half()
    for chunk in (3, 6, 12, 1 << 22):  # block edges before, at and after the base's last row
        assert torch.equal(prep.add_delta(base, delta, torch.float16, chunk_elems=chunk), want)
    assert torch.equal(prep.add_delta(base, None, torch.float32), base.float())
    for chunk in (3, 1 << 22):  # in place: base merged in the output dtype, already grown by a zero row
        assert torch.equal(prep.add_delta(torch.cat([base, torch.zeros(1, 3).half()]), delta, torch.float16,
                                          chunk_elems=chunk), want)


@pytest.mark.parametrize("name", ["params.json", "added_tokens.json", "tokenizer_config.json",
                                  "special_tokens_map.json"])
def test_damaged_json_is_one_line_naming_the_file(files: dict[str, Path], tmp_path: Path, name: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    meta, delta = tmp_path / "LLaMA" / "7B", tmp_path / "delta"
    shutil.copytree(files["meta"], meta)
    shutil.copyfile(files["meta"].parent / "tokenizer.model", meta.parent / "tokenizer.model")
    shutil.copytree(files["delta"], delta)
    bad = meta / name if name == "params.json" else delta / name
    bad.write_text('{"dim": 64,')  # truncated
    args = ["--meta-dir", str(meta), "--delta", str(delta), "--out", str(tmp_path / "out"), "--dtype", "fp32"]
    assert prep.main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars and notes come before
    assert last.startswith(f"error: {bad}: not valid JSON (") and "; download" in last, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.safetensors"))  # refused before any shard is written


def test_damaged_tokenizer_model_is_one_line_naming_the_file(files: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    meta = tmp_path / "LLaMA" / "7B"
    shutil.copytree(files["meta"], meta)
    tok = meta.parent / "tokenizer.model"
    tok.write_bytes(TOKENIZER.read_bytes()[:1000])  # an interrupted download
    assert prep.main(["--meta-dir", str(meta), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tok}: not a SentencePiece tokenizer.model") and "--tokenizer PATH" in last, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.safetensors"))
