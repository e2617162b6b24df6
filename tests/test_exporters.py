"""Exporters on a tiny real model: parity with PyTorch, loaders of each ecosystem, atomic folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer

from exporters import FORMATS, export
from exporters.runtime import OnnxSpecialist, mean_cross_entropy
from soe_sdk.config import ModelConfig
from soe_sdk.errors import ExportError
from soe_sdk.model import forward, generate, init_parameters, next_token_loss
from trainer.tokenizer import train_tokenizer

CONFIG = ModelConfig(vocab_size=300, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, d_mlp=64)
SENTENCES = ["the quick brown fox jumps over the lazy dog", "a soup of experts makes small specialist models",
             "SELECT name FROM users WHERE id = 1;", "def main():\n    return 0\n"]
PROMPTS = ["the quick", "SELECT", "a soup of", ""]
METADATA = {"name": "tiny-test", "domain_weights": [0.25, 0.75]}


def _tokenizer_json() -> str:
    return train_tokenizer(SENTENCES * 10, CONFIG.vocab_size).to_str()


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = init_parameters(CONFIG, gen)
    # non-trivial LayerNorm gains/biases and sharper logits than a fresh init
    return {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in params.items()}


@pytest.fixture(scope="module")
def model() -> tuple[dict[str, torch.Tensor], str]:
    return _params(), _tokenizer_json()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, Path]:
    """Every format exported once for the whole module."""
    params, tok = model
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(params, CONFIG, tok, root / fmt, fmt, METADATA).out_dir for fmt in FORMATS}


def _torch_greedy(params, ids: list[int], new: int) -> list[int]:
    out = generate(params, CONFIG, torch.tensor([ids or [0]]), new, eos_token_id=0)
    return out[0, len(ids or [0]):].tolist()


def test_formats_and_common_files(exported):
    assert set(FORMATS) == {"onnx", "onnx-int8", "onnx-int4", "onnx-fp16", "hf", "gguf", "safetensors"}
    for fmt, folder in exported.items():
        names = {p.name for p in folder.iterdir()}
        assert {"tokenizer.json", "specialist.json", "README.md"} <= names, fmt
        info = json.loads((folder / "specialist.json").read_text())
        assert info["name"] == "tiny-test" and info["domain_weights"] == [0.25, 0.75]
        assert info["format"] == fmt and info["validation"]
        for name, size in info["files"].items():
            if name != "specialist.json":
                assert (folder / name).stat().st_size == size
        assert "tiny-test" in (folder / "README.md").read_text()
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_onnx_graph_interface(exported):
    graph = onnx.load(str(exported["onnx"] / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i.type.tensor_type for i in graph.graph.input}
    assert inputs["input_ids"].elem_type == onnx.TensorProto.INT64
    assert inputs["attention_mask"].elem_type == onnx.TensorProto.INT64
    assert inputs["past_key_values.1.value"].elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inputs["past_key_values.0.key"].shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 2 and isinstance(dims[2], str) and dims[3] == 16
    outputs = [o.name for o in graph.graph.output]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    # the tied embedding is stored once
    big = [i.name for i in graph.graph.initializer if np.prod(i.dims) == CONFIG.vocab_size * CONFIG.d_model]
    assert big == ["wte.weight"]


def test_onnx_parity_with_and_without_past(model, exported):
    params, _ = model
    runner = OnnxSpecialist.load(exported["onnx"])
    rng = np.random.default_rng(1)
    ids = rng.integers(1, CONFIG.vocab_size, size=(2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0  # left padding
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    logits, present = runner.run(ids, mask, pos, runner.empty_past(2))
    ref, ref_cache = forward(params, CONFIG, torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(pos), use_cache=True)
    real = mask.astype(bool)
    assert np.abs(logits[real] - ref.detach().numpy()[real]).max() <= 1e-3
    flat = [t.detach().numpy() for kv in ref_cache for t in kv]
    assert max(np.abs(a - b).max() for a, b in zip(present, flat)) <= 1e-3
    # one decode step on the cache
    step = rng.integers(1, CONFIG.vocab_size, size=(2, 1))
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    logits2, present2 = runner.run(step, mask2, pos[:, -1:] + 1, present)
    ref2, ref_cache2 = forward(params, CONFIG, torch.from_numpy(step), attention_mask=torch.from_numpy(mask2),
                               position_ids=torch.from_numpy(pos[:, -1:] + 1), past_key_values=ref_cache,
                               use_cache=True)
    assert np.abs(logits2 - ref2.detach().numpy()).max() <= 1e-3
    assert present2[0].shape == (2, CONFIG.n_heads, 8, CONFIG.head_dim)
    assert np.abs(present2[3] - ref_cache2[1][1].detach().numpy()).max() <= 1e-3
    assert (logits2.argmax(-1) == ref2.argmax(-1).numpy()).all()


def test_runtime_greedy_matches_pytorch_generate(model, exported):
    params, tok = model
    runner = OnnxSpecialist.load(exported["onnx"])
    tokenizer = Tokenizer.from_str(tok)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        assert runner.generate_ids(ids, 30) == _torch_greedy(params, ids, 30), prompt
    text = runner.generate("the quick", max_new_tokens=12)
    assert isinstance(text, str) and text == tokenizer.decode(_torch_greedy(params, tokenizer.encode("the quick").ids, 12))


def test_runtime_sampling_and_limits(exported):
    runner = OnnxSpecialist.load(exported["onnx"])
    ids = runner.tokenizer.encode("the lazy").ids
    a = runner.generate_ids(ids, 20, temperature=1.0, seed=3)
    assert a == runner.generate_ids(ids, 20, temperature=1.0, seed=3)
    assert runner.generate_ids(ids, 20, temperature=0.7, top_k=1, seed=5) == runner.generate_ids(ids, 20)
    assert len(runner.generate_ids(list(range(1, 60)), 50)) <= CONFIG.max_seq_len - 59  # context is capped
    with pytest.raises(ValueError):
        runner.logits(np.ones(CONFIG.max_seq_len + 1, np.int64))


def test_runtime_loss_matches_pytorch(model, exported):
    params, _ = model
    runner = OnnxSpecialist.load(exported["onnx"])
    texts = SENTENCES[:2]
    stream = []
    for text in texts:
        stream += runner.tokenizer.encode(text).ids + [0]
    expected = next_token_loss(params, CONFIG, torch.tensor([stream])).item()
    assert runner.loss(texts) == pytest.approx(expected, abs=1e-4)
    logits = runner.logits(stream[:-1])
    assert mean_cross_entropy(logits, np.asarray(stream[1:])) == pytest.approx(expected, abs=1e-4)


def test_onnxruntime_genai_generates_like_pytorch(model, exported):
    og = pytest.importorskip("onnxruntime_genai")
    params, tok = model
    og_model = og.Model(str(exported["onnx"]))
    og_tok = og.Tokenizer(og_model)
    prompt_ids = [int(i) for i in og_tok.encode("the quick brown")]
    assert prompt_ids == Tokenizer.from_str(tok).encode("the quick brown").ids
    search = og.GeneratorParams(og_model)
    search.set_search_options(max_length=len(prompt_ids) + 20)
    generator = og.Generator(og_model, search)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]
    expected = _torch_greedy(params, prompt_ids, 20)
    assert got[:len(expected)] == expected


@pytest.mark.parametrize("fmt", ["onnx-int8", "onnx-int4", "onnx-fp16"])
def test_smaller_onnx_variants_load_and_run(fmt, model, exported):
    folder = exported[fmt]
    info = json.loads((folder / "specialist.json").read_text())["validation"]
    assert 0.0 <= info["argmax_agreement"] <= 1.0 and np.isfinite(info["loss_delta"])
    runner = OnnxSpecialist.load(folder)
    logits = runner.logits(runner.tokenizer.encode(SENTENCES[0]).ids)
    assert logits.shape[-1] == CONFIG.vocab_size and np.isfinite(logits).all()
    ours = runner.generate_ids([5, 6, 7], 10)
    assert len(ours) >= 1
    og = pytest.importorskip("onnxruntime_genai")
    og_model = og.Model(str(folder))
    search = og.GeneratorParams(og_model)
    search.set_search_options(max_length=3 + len(ours))
    generator = og.Generator(og_model, search)
    generator.append_tokens([5, 6, 7])
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)][3:] == ours  # same graph, same greedy tokens
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    if fmt in ("onnx-int8", "onnx-int4"):
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
        # the tied embedding is stored once: the lookup reads the output layer's quantized weights
        head = next(n for n in graph.node if n.op_type == "MatMulNBits"
                    and any(a.name == "N" and a.i == CONFIG.vocab_size for a in n.attribute))
        lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
        assert lookup.input[0] == head.input[1]
        assert not any(i.dims[:1] == [CONFIG.vocab_size] and i.data_type == onnx.TensorProto.FLOAT
                       and len(i.dims) == 2 and i.dims[1] == CONFIG.d_model for i in graph.initializer)
    sizes = (folder / "model.onnx").stat().st_size, (exported["onnx"] / "model.onnx").stat().st_size
    assert sizes[0] < sizes[1]


def test_hf_folder_loads_with_transformers(model, exported):
    transformers = pytest.importorskip("transformers")
    params, tok = model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported["hf"])).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported["hf"]))
    ids = hf_tok("a soup of experts", return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer.from_str(tok).encode("a soup of experts").ids
    assert hf_tok.eos_token_id == 0
    with torch.inference_mode():
        got = hf(ids).logits
        ref, _ = forward(params, CONFIG, ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_gguf_reads_back(model, exported):
    gguf = pytest.importorskip("gguf")
    params, tok = model
    reader = gguf.GGUFReader(str(exported["gguf"] / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == len(params)
    qkv = tensors["blk.1.attn_qkv.weight"]
    assert [int(d) for d in qkv.shape] == [CONFIG.d_model, 3 * CONFIG.d_model]  # GGUF order: [in, out]
    assert np.array_equal(np.asarray(qkv.data).reshape(3 * CONFIG.d_model, CONFIG.d_model),
                          params["h.1.attn.qkv.weight"].numpy())
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(CONFIG.vocab_size, -1),
                          params["wte.weight"].numpy())
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(CONFIG.d_model, CONFIG.d_mlp),
                          params["h.0.mlp.proj.weight"].numpy())
    fields = reader.fields
    assert fields["general.architecture"].contents() == "gpt2"
    assert fields["gpt2.feed_forward_length"].contents() == CONFIG.d_mlp
    tokens = fields["tokenizer.ggml.tokens"].contents()
    vocab = Tokenizer.from_str(tok).get_vocab()
    assert len(tokens) == CONFIG.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0


def test_gguf_runs_in_llama_cpp(model, exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    params, tok = model
    llm = llama_cpp.Llama(model_path=str(exported["gguf"] / "model.gguf"), n_ctx=CONFIG.max_seq_len,
                          logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)  # f32 KV cache
    prompt = Tokenizer.from_str(tok).encode("the quick brown").ids
    assert llm.tokenize("the quick brown".encode(), add_bos=False, special=False) == prompt
    llm.eval(prompt)
    ref, _ = forward(params, CONFIG, torch.tensor([prompt]))
    got = np.asarray(llm.scores[:len(prompt)])
    # ggml evaluates GELU through an fp16 lookup table: ~2e-3 off, never enough to move the argmax here
    assert np.abs(got - ref[0].numpy()).max() <= 1e-2
    assert (got.argmax(-1) == ref[0].numpy().argmax(-1)).all()
    greedy = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        greedy.append(token)
        if len(greedy) == 12 or token == 0:
            break
    assert greedy == _torch_greedy(params, prompt, 12)[:len(greedy)]


def test_safetensors_round_trip(model, exported):
    from safetensors.torch import load_file

    params, _ = model
    loaded = load_file(str(exported["safetensors"] / "model.safetensors"))
    assert set(loaded) == set(params) and all(torch.equal(loaded[k], params[k]) for k in params)
    config = ModelConfig.from_dict(json.loads((exported["safetensors"] / "config.json").read_text()))
    assert config == CONFIG


def test_failed_export_leaves_no_folder(model, tmp_path):
    params, tok = model
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError) as err:
        export(params, CONFIG, tok, blocker / "out", "onnx", METADATA)
    assert "\n" not in str(err.value)
    # params that do not fit the config they come with
    wrong = ModelConfig(vocab_size=300, max_seq_len=64, d_model=32, n_layers=3, n_heads=2, d_mlp=64)
    with pytest.raises(ExportError, match="params"):
        export(params, wrong, tok, tmp_path / "out", "hf", METADATA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failed_validation_keeps_previous_export(model, tmp_path, monkeypatch):
    params, tok = model
    out = tmp_path / "specialist"
    export(params, CONFIG, tok, out, "safetensors", METADATA)
    before = (out / "model.safetensors").read_bytes()
    import exporters.onnx as onnx_exporter

    monkeypatch.setattr(onnx_exporter, "PARITY_TOL", -1.0)  # no graph can pass: forces a validation failure
    with pytest.raises(ExportError, match="validation failed"):
        export(params, CONFIG, tok, out, "onnx", METADATA)
    assert (out / "model.safetensors").read_bytes() == before and not (out / "model.onnx").exists()
    monkeypatch.undo()
    export(params, CONFIG, tok, out, "onnx", METADATA)  # a successful export replaces the old folder whole
    assert (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["specialist"]


def test_bad_format_and_tokenizer(model, tmp_path):
    params, tok = model
    with pytest.raises(ExportError, match="unknown"):
        export(params, CONFIG, tok, tmp_path / "x", "tflite", METADATA)
    with pytest.raises(ExportError, match="tokenizer_json"):
        export(params, CONFIG, "{not json", tmp_path / "x", "gguf", METADATA)
    assert not list(tmp_path.iterdir())


def test_runtime_import_is_torch_free():
    code = ("import sys, exporters.runtime; import exporters; "
            "print('torch' in sys.modules, 'soe_sdk' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]
