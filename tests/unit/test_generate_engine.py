"""Text generation without a server: the decoder against transformers, the engine against ``generate``,
sampling, streaming text and stop strings, request checks, folders refused, and one compiled graph."""

import json

import pytest
import torch

from aitune_core.archive import ArchiveOptions, archive_model
from aitune_core.errors import ArchiveError, BadRequestError
from aitune_core.generate.engine import Engine
from aitune_core.generate.folder import load_decoder
from aitune_core.generate.prepare import prepare
from aitune_core.generate.request import GenerateOptions, parse
from aitune_core.generate.sampling import SamplingParams, greedy_tokens, sample
from aitune_core.generate.text import REPLACEMENT, Detokenizer, StopText
from models.llm_folders import make_llm_folder, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(512)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("llms")
    return {"llama": make_llm_folder(root / "llama", tokenizer=tokenizer),
            "qwen2": make_llm_folder(root / "qwen2", architecture="qwen2", kv_heads=4, tokenizer=tokenizer, seed=1),
            "mistral": make_llm_folder(root / "mistral", architecture="mistral", layers=3, tokenizer=tokenizer,
                                       seed=2)}


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_decoder_logits_equal_transformers(folders, architecture):
    decoder, _ = load_decoder(folders[architecture], None, 2)
    model = hf_model(folders[architecture])
    ids = torch.randint(3, 500, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        got = decoder(ids, torch.arange(37).unsqueeze(0), torch.tensor([1]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_engine_equals_generate_token_for_token(folders, tokenizer, architecture):
    prepared = prepare(folders[architecture], None, None)
    engine = Engine(prepared.module, tokenizer, prepared.options)
    model = hf_model(folders[architecture])
    for prompt in ["x", "def f(a, b):\n    return", "for i in range(10):\n    print(i)\n" * 20]:
        request = parse({"prompt": prompt, "max_new_tokens": 64}, tokenizer, prepared.options)
        ids = torch.tensor([request.prompt_ids])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
        assert engine.generate(request).tokens == expected, prompt[:20]


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, SamplingParams(), None) == 1
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1), torch.Generator().manual_seed(0)) == 1
    assert sample(logits, SamplingParams(temperature=5.0, top_p=0.01), torch.Generator().manual_seed(0)) == 1
    draws = [sample(logits, SamplingParams(temperature=1.0, seed=3), SamplingParams(seed=3).generator())
             for _ in range(3)]
    assert len(set(draws)) == 1  # a seed repeats
    many = {sample(logits, SamplingParams(temperature=2.0, top_k=2), torch.Generator().manual_seed(i)) for i in range(40)}
    assert many == {1, 3}  # top_k keeps the two best


def test_greedy_tokens_of_a_batch_are_torch_argmax_of_each_row():
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[0.0, 3.0, 1.0, 3.0],  # equal maxima: the first
                         [1.0, nan, 5.0, nan],  # a NaN: the first NaN
                         [-inf, -inf, -inf, -inf],
                         [2.0, -1.0, 0.5, 1.9]])
    expected = [int(row.argmax()) for row in rows]
    assert greedy_tokens(rows) == expected == [1, 1, 0, 0]
    assert greedy_tokens(rows.bfloat16()) == expected
    with torch.inference_mode():
        many = torch.randn(8, 32000)
    assert greedy_tokens(many) == many.argmax(-1).tolist()
    close = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)  # equal in fp32: numpy sees the fp64 values
    assert greedy_tokens(close) == [1]
    assert sample(many[3], SamplingParams(), None) == int(many[3].argmax())


def test_streamed_text_is_whole_characters(tokenizer):
    text = "naïve café 中文 🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level: characters split across tokens
    detokenizer = Detokenizer(tokenizer, [0])
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 3


def test_stop_strings_across_pieces():
    stop = StopText(["\n\n", "END"])
    sent = [stop.add(piece) for piece in ["Hello", " wor", "ld\n", "\nmore"]]
    assert "".join(piece for piece, _ in sent) == "Hello world" and sent[-1][1]
    stop = StopText(["END"])
    sent = [stop.add(piece) for piece in ["a E", "N", "x", "EN", "D tail"]]
    assert "".join(piece for piece, _ in sent) == "a ENx" and sent[-1][1]
    stop = StopText([])
    assert stop.add("abc") == ("abc", False)


def test_request_checks(tokenizer):
    options = GenerateOptions(max_context=64, max_batch=2, prefill_chunk=16, eos_token_ids=[1])
    request = parse("a prompt", tokenizer, options)
    assert request.max_new_tokens == 64 - len(request.prompt_ids) and request.sampling.temperature == 0
    for body, message in (({"prompt": "hi", "seed": -1}, "'seed' must be between"),
                          ({"prompt": "hi", "top_k": 1.5}, "'top_k' must be an integer"),
                          ({"prompt": "hi", "temperature": "hot"}, "'temperature' must be a finite number"),
                          ({"prompt": "hi", "top_p": float("nan")}, "'top_p' must be a finite number, got nan"),
                          ({"prompt": "hi", "stop": ["a"] * 17}, "at most 16"),
                          ({"prompt": "word " * 80}, "the archive's context holds 64 tokens"),
                          ([1], "expected a JSON object with 'prompt'"),
                          ({"prompt": "hi", "stream_interval": 0}, "'stream_interval' must be between 1 and 64"),
                          ({"prompt": "hi", "stream_interval": 65}, "'stream_interval' must be between 1 and 64"),
                          ({"prompt": "hi", "stream_interval": "2"}, "'stream_interval' must be an integer")):
        with pytest.raises(BadRequestError, match=message.replace("(", r"\(")):
            parse(body, tokenizer, options)
    assert request.stream_interval == 1 and parse({"prompt": "hi", "stream_interval": 4}, tokenizer,
                                                  options).stream_interval == 4
    options.stream_interval = 3  # the archive's --stream-interval: what a request that names none gets
    assert parse("hi", tokenizer, options).stream_interval == 3


def test_folders_that_cannot_be_served(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["llama"], tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (({"architectures": ["GPTNeoXForCausalLM"]}, "GPTNeoXForCausalLM is not served for text generation"),
                             ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
                              "changes with the sequence length"),
                             ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported")):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ArchiveError, match=message):
            load_decoder(folder, None, None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchiveError, match="--max-context must be between 2 and the model's 512"):
        load_decoder(folder, 4096, None)


def test_gate_refuses_what_misses_it_and_the_archive_holds_no_cache(folders, tmp_path):
    with pytest.raises(ArchiveError, match="Generation accuracy gate failed: top-1 agreement"):
        archive_model(ArchiveOptions(model_name="g", hf_model=folders["llama"], quantization="int8wo",
                                     min_top1=1.0, max_kl=0.0, export_path=tmp_path))
    assert not list(tmp_path.iterdir())
    result = archive_model(ArchiveOptions(model_name="g", hf_model=folders["llama"], backend="eager",
                                          max_context=128, max_batch=2, export_path=tmp_path))
    import zipfile

    with zipfile.ZipFile(result.archive_path) as mar:
        manifest = json.loads(mar.read("aitune_manifest.json"))
        mar.extract("checkpoint.pt", tmp_path)
    assert manifest["model"]["generate"]["max_context"] == 128 and manifest["request"]["codec"] == "generate"
    assert manifest["request"]["gate"]["passed"] and manifest["request"]["gate"]["top1"] == 1.0

    def keys(value):
        if isinstance(value, dict):
            return [str(key) for key in value] + [k for item in value.values() for k in keys(item)]
        return [k for item in value for k in keys(item)] if isinstance(value, (list, tuple)) else []

    stored = keys(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert any(key.endswith("q_proj.weight") for key in stored) and "rope_inv_freq" in stored
    assert not any("cache" in key for key in stored)  # the KV cache is allocated by the worker, never stored


def test_compiled_decoder_never_recompiles(folders, tokenizer, monkeypatch, tmp_path):
    """One graph for every prompt length (chunks of 128 and last chunks padded to a multiple of 16), every number
    of live sequences and every attention window."""
    from torch._dynamo.utils import counters

    # A graph inductor's cache kept from another run brings that compile's size guards (seen: window <= 255):
    # what this test counts is what a compile of these samples guards.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    from aitune_core.backends import make_backend
    from aitune_core.graph_spec import GraphSpec
    from aitune_core.serving import warm_up

    prepared = prepare(folders["llama"], 256, 4)
    spec, _ = GraphSpec.record(prepared.module, prepared.samples)
    backend = make_backend("compile", ahead_of_time=False).build(prepared.module, spec, prepared.samples, "cpu")
    warm_up(backend)  # what a worker does before its first request
    frames = counters["stats"]["unique_graphs"]
    engine = Engine(backend.infer, tokenizer, prepared.options)
    for prompt in ["a", "def main():\n    return 0\n" * 2, "def main():\n    return 0\n" * 12]:
        engine.generate(parse({"prompt": prompt, "max_new_tokens": 5}, tokenizer, prepared.options))
    for rows, span in ((1, 64), (3, 128), (4, 256)):  # sequences and attention windows of every size
        backend.infer(torch.full((rows, 1), 5), torch.full((rows, 1), 7), torch.arange(rows),
                      torch.arange(span).repeat(rows, 1))
    assert counters["stats"]["unique_graphs"] == frames


def test_tune_ranks_generation_candidates_by_decode_rate_within_the_gate(folders, tmp_path, capsys):
    from aitune_core.archive import main as archive_main

    argv = ["--model-name", "tuned", "--hf-model", str(folders["llama"]), "--tune", "--candidates",
            "eager,int8wo,int8dq", "--min-top1", "0.99", "--export-path", str(tmp_path), "--archive-format",
            "no-archive"]
    assert archive_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Tuning report on cpu (decode tokens/s at one stream, generation gate)" in out
    manifest = json.loads((tmp_path / "tuned" / "aitune_manifest.json").read_text())
    rows = {row["name"]: row for row in manifest["request"]["tuning"]}
    assert set(rows) == {"eager", "int8wo", "int8dq"}
    assert rows["eager"]["top1"] == 1.0 and rows["eager"]["tokens_per_s"] > 0
    assert all(row["outcome"].startswith("out: generation gate") for name, row in rows.items() if name != "eager")
    assert rows["eager"]["outcome"] == "chosen" and manifest["backend"] == "TorchEagerBackend"


def test_int4wo_archive_quantizes_the_decoder_and_stores_its_gate(tokenizer, tmp_path):
    """Random weights lose far more to int4 than a trained model's (docs/generate.md has both): the gate is
    opened here so that the archive is built, and its figures are what the manifest keeps."""
    from aitune_core.serving import load_model

    folder = make_llm_folder(tmp_path / "llm128", hidden=128, intermediate=256, tokenizer=tokenizer)
    result = archive_model(ArchiveOptions(model_name="g4", hf_model=folder, quantization="int4wo", max_context=128,
                                          max_batch=2, min_top1=0.0, max_kl=100.0, export_path=tmp_path / "store",
                                          archive_format="no-archive"))
    directory = result.archive_path
    manifest = json.loads((directory / "aitune_manifest.json").read_text())
    gate = manifest["request"]["gate"]
    assert gate["passed"] and 0.0 < gate["top1"] < 1.0 and gate["kl"] > 0.0
    weights = torch.load(directory / "checkpoint.pt", weights_only=True)["weights"]
    quantized = {key for key, value in weights.items() if type(value).__name__ == "Int4OpaqueTensor"}
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"} <= quantized
    model = load_model(directory, torch.device("cpu"))
    engine = Engine(model.backend.infer, model.codec.tokenizer, model.codec.options)
    request = parse({"prompt": "import os", "max_new_tokens": 8}, model.codec.tokenizer, model.codec.options)
    assert engine.generate(request).tokens == engine.generate(request).tokens


def test_a_bf16_kv_cache_decodes_close_to_fp32_and_refuses_other_dtypes(folders, tmp_path):
    prepared = prepare(folders["llama"], 128, 2)
    ids = torch.randint(3, 500, (1, 37), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(37).unsqueeze(0)
    with torch.no_grad():
        fp32 = prepared.module(ids, positions, torch.tensor([1]))
        prepared.module.use_kv_cache("bfloat16")
        bf16 = prepared.module(ids, positions, torch.tensor([1]))
    caches = {buffer.dtype for name, buffer in prepared.module.named_buffers() if name.endswith("_cache")}
    assert caches == {torch.bfloat16} and prepared.module.config.kv_cache_dtype == "bfloat16"
    assert not torch.equal(bf16, fp32)  # the keys and values were rounded
    # bf16 keeps 8 bits of each key and value: the logits move by a few hundredths of their spread (std ~2.4 here).
    assert float((bf16 - fp32).abs().max()) < 0.1 * float(fp32.std())
    assert float((bf16 - fp32).abs().mean()) < 0.02 * float(fp32.std())
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of float32, bfloat16, got 'float16'"):
        prepared.module.use_kv_cache("float16")
    with pytest.raises(ArchiveError, match="--kv-cache-dtype must be one of float32, bfloat16, got 'int8'"):
        prepare(folders["llama"], 128, 2, "int8")
    with pytest.raises(ArchiveError, match="--precision bf16 casts the whole decoder, its KV cache included"):
        archive_model(ArchiveOptions(model_name="kv", hf_model=folders["llama"], precision="bf16",
                                     kv_cache_dtype="bfloat16", export_path=tmp_path, archive_format="no-archive"))
    with pytest.raises(ArchiveError, match="--stream-interval must be between 1 and 64 .*, got 0"):
        archive_model(ArchiveOptions(model_name="kv", hf_model=folders["llama"], stream_interval=0,
                                     export_path=tmp_path, archive_format="no-archive"))
    assert not any(tmp_path.iterdir())


def test_a_bf16_kv_cache_archive_holds_it_and_is_gated_against_the_fp32_cache(folders, tmp_path):
    """The archive's decoder (and the worker's) holds a bf16 cache; the gate's reference does not: an eager archive,
    whose only difference from the reference is its cache, is measured with KL above 0."""
    from aitune_core.generate.folder import empty_decoder
    from aitune_core.serving import load_model

    result = archive_model(ArchiveOptions(model_name="kv", hf_model=folders["llama"], backend="eager",
                                          kv_cache_dtype="bfloat16", max_context=128, max_batch=2,
                                          export_path=tmp_path, archive_format="no-archive"))
    manifest = json.loads((result.archive_path / "aitune_manifest.json").read_text())
    assert manifest["model"]["generate"]["kv_cache_dtype"] == "bfloat16"
    gate = manifest["request"]["gate"]
    assert gate["passed"] and gate["kl"] > 0.0
    model = load_model(result.archive_path, torch.device("cpu"))
    assert {buffer.dtype for name, buffer in model.backend._module.named_buffers() if name.endswith("_cache")} == {
        torch.bfloat16}
    reference = empty_decoder(manifest["model"]["generate"])
    reference.load_state_dict(model.backend._module.state_dict())
    engine = Engine(model.backend.infer, model.codec.tokenizer, model.codec.options)
    request = parse({"prompt": "import os", "max_new_tokens": 8}, model.codec.tokenizer, model.codec.options)
    assert engine.generate(request).tokens == Engine(reference, model.codec.tokenizer,
                                                     model.codec.options).generate(request).tokens


def test_archives_made_before_the_attention_window_get_three_inputs(folders, tokenizer):
    """A manifest without ``attention_window`` (archives made before it) runs its decoder as it was compiled:
    tokens, positions, slots; a new one adds the window, past every row's position."""
    prepared = prepare(folders["llama"], 256, 2)
    section = {key: value for key, value in prepared.options.to_dict().items() if key != "attention_window"}
    calls = []

    def infer(*args):
        calls.append(args)
        return prepared.module(*args)

    request = parse({"prompt": "a b c", "max_new_tokens": 3}, tokenizer, prepared.options)
    old = Engine(infer, tokenizer, GenerateOptions.from_dict(section)).generate(request)
    assert {len(args) for args in calls} == {3}
    calls.clear()
    new = Engine(infer, tokenizer, prepared.options).generate(request)
    assert {len(args) for args in calls} == {4} and new.tokens == old.tokens
    assert all(args[3].shape[1] > int(args[1].max()) for args in calls)
