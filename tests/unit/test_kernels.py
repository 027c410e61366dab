"""The CPU kernels: every instruction-set level this CPU runs built and loaded, the weight-only products equal to
dequantize-then-matmul on odd shapes, the attention over a KV cache equal to its gathered reference, kept whole by
torch.compile, and the backend that swaps the products in, through its checkpoint."""

import pytest
import torch

from aitune_core.kernels import build, ops
from aitune_core.kernels.layers import Int4Linear, Int8Linear, swap_linears
from aitune_core.kernels.quantize import pack_int4, quantize_int8


def close(actual, expected):
    """Equal within float rounding: the kernels sum in another order than a matmul."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    return actual.shape == expected.shape and bool(((actual - expected).abs() <= 1e-5 * scale + 1e-6).all())


def test_the_best_build_this_cpu_runs_is_loaded():
    assert build.native() is not None, build.failure()
    here = build.levels_here()
    assert here and here[-1].name == "x86_64"  # every x86-64 CPU runs the baseline build
    assert build.loaded().level == here[0]
    assert f"{here[0].name} build" in build.describe() and build.native().tiles() in build.describe()


# Rows 5 / 6, 10 / 11: where AMX needs one more tile of activations; out_features 87: pairs of 16-row blocks and
# one block left over, then 7 rows for the AVX-512 tiles.
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 8, 10, 11, 15, 16, 17, 40, 128, 129, 513])
@pytest.mark.parametrize("in_features, out_features", [(40, 17), (100, 1), (4096 + 24, 33), (272, 203), (192, 87)])
def test_int8_equals_dequantize_then_matmul(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows + in_features)
    weight, scale = quantize_int8(torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(rows, in_features, generator=generator)
    expected = x.double() @ ops.dequantize_int8(weight, scale).double().T
    assert close(ops.int8_weight_only_mm(x, weight, scale).double(), expected)


@pytest.mark.parametrize("rows", [0, 1, 2, 4, 7, 8, 15, 16, 33, 129])
@pytest.mark.parametrize("in_features, out_features, group_size",
                         [(64, 17, 32), (384, 5, 128), (512, 48, 256), (192, 203, 64)])
def test_int4_equals_dequantize_then_matmul(rows, in_features, out_features, group_size):
    generator = torch.Generator().manual_seed(rows + in_features)
    packed, scale, offset = pack_int4(torch.randn(out_features, in_features, generator=generator), group_size)
    x = torch.randn(rows, in_features, generator=generator)
    expected = x.double() @ ops.dequantize_int4(packed, scale, offset, group_size).double().T
    assert close(ops.int4_weight_only_mm(x, packed, scale, offset, group_size).double(), expected)


TILES = {"amx": "AMX int8 tiles", "avx512": "AVX-512 tiles", "avx2": "portable tiles", "x86_64": "portable tiles"}


@pytest.mark.parametrize("level", build.levels_here(), ids=lambda level: level.name)
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 15, 40])
def test_every_build_this_cpu_runs_equals_dequantize_then_matmul(level, rows):
    """Each level's build as a CPU of that level runs it (the AVX-512 tiles where AMX is switched off, the portable
    loops without AVX-512, compiled for AVX2 and for any x86-64)."""
    kernels = build.load_level(level.name)
    granted = level.name != "amx" or kernels.tiles().startswith("AMX")  # the OS may not grant AMX's tiles
    assert kernels.tiles().startswith(TILES[level.name] if granted else "AVX-512 tiles")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(203, 4096 + 64, generator=generator)
    x = torch.randn(rows, 4096 + 64, generator=generator)
    int8 = quantize_int8(weight)
    assert close(kernels.int8_weight_only_mm(x, *int8).double(), x.double() @ ops.dequantize_int8(*int8).double().T)
    int4 = pack_int4(weight, 64)
    assert close(kernels.int4_weight_only_mm(x, *int4, 64).double(),
                 x.double() @ ops.dequantize_int4(*int4, 64).double().T)
    for length in (1, 9):  # decode rows in loops; prompt chunks in two GEMMs
        attention = attention_case(rows, length, 6, 2, 40)
        assert close(kernels.cached_attention(*attention).double(), attention_reference(*attention))
        bf16_cache = (attention[0], attention[1].bfloat16(), attention[2].bfloat16(), *attention[3:])
        assert close(kernels.cached_attention(*bf16_cache).double(), attention_reference(*bf16_cache))


AVX2_ONLY = {name: True for name in ("avx", "avx2", "fma3", "bmi", "bmi2", "f16c", "lzcnt")}
AVX512 = {**AVX2_ONLY, **{f"avx512_{name}": True for name in ("f", "bw", "vl", "dq", "cd", "vnni", "bf16")}}


@pytest.mark.parametrize("features, levels", [
    ({}, ["x86_64"]), (AVX2_ONLY, ["avx2", "x86_64"]), (AVX512, ["avx512", "avx2", "x86_64"]),
    ({**AVX512, "amx_tile": True, "amx_int8": True, "amx_bf16": True}, ["amx", "avx512", "avx2", "x86_64"]),
    ({**AVX2_ONLY, "avx512_f": True}, ["avx2", "x86_64"])], ids=["sse", "avx2", "avx512", "amx", "avx512f-only"])
def test_a_cpu_runs_the_levels_whose_features_it_has(features, levels):
    assert [level.name for level in build.levels_here(features)] == levels


def test_a_level_the_cpu_cannot_run_is_refused_and_the_switch_names_what_it_takes(monkeypatch):
    monkeypatch.setattr(build, "cpu_features", lambda: dict(AVX2_ONLY))
    with pytest.raises(ValueError, match="this CPU cannot run the avx512 build of the kernels"):
        build.load_level("avx512")
    monkeypatch.setenv(build.SWITCH, "avx512")
    with pytest.raises(build.KernelBuildError, match="AITUNE_CPU_KERNELS=avx512: this CPU cannot run that build"):
        build.choose()
    monkeypatch.setenv(build.SWITCH, "sse9")
    with pytest.raises(build.KernelBuildError, match="'sse9' is no level: expected one of amx, avx512, avx2, x86_64 "
                                                     "or torch"):
        build.choose()


AMX = build.native() is not None and build.native().tiles().startswith("AMX")


@pytest.mark.parametrize("rows", [0, 1, 5, 6, 8, 11, 16, 17, 40, 513])
@pytest.mark.parametrize("in_features, out_features", [(64, 16), (128, 48), (1024, 160), (4096, 32)])
def test_int8_in_the_amx_layout_equals_dequantize_then_matmul(rows, in_features, out_features):
    """513 rows: past the kernels' rows, the op unpacks the layout in torch."""
    generator = torch.Generator().manual_seed(rows + in_features)
    weight, scale = quantize_int8(torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(rows, in_features, generator=generator)
    expected = x.double() @ ops.dequantize_int8(weight, scale).double().T
    packed = ops.pack_int8_amx(weight)
    assert torch.equal(ops.unpack_int8_amx(packed), weight)
    assert close(ops.int8_amx_mm(x, packed, scale).double(), expected)
    if rows > 1:  # a row with a NaN gives NaN outputs, the others theirs
        x[1, 3] = float("nan")
        out = ops.int8_amx_mm(x, packed, scale)
        assert out[1].isnan().all() and close(out[[0]].double(), expected[[0]])


def test_int8_layers_take_the_amx_layout_where_it_runs_and_keep_rows_in_their_state():
    linear = torch.nn.Linear(128, 48)
    rows, layer = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear)
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    assert layer.use_amx_layout() == AMX
    assert not Int8Linear.from_linear(torch.nn.Linear(40, 17)).use_amx_layout()  # not whole tiles
    x = torch.randn(3, 5, 128)
    assert close(layer(x), rows(x)) and close(torch.compile(layer, fullgraph=True)(x), rows(x))
    assert all(torch.equal(state[key], value) for key, value in layer.state_dict().items())
    loaded = Int8Linear(128, 48)
    loaded.use_amx_layout()
    loaded.load_state_dict(state)
    assert close(loaded(x), rows(x))


def test_the_amx_products_keep_fp32_precision_with_an_outlier_input():
    """AMX sums int8 pieces of each activation row scaled by its largest value: an input 50x the others
    must not cost the rest their precision (error of the same order as an fp32 matmul's)."""
    generator = torch.Generator().manual_seed(0)
    weight, scale = quantize_int8(torch.randn(256, 4096, generator=generator) * 0.02)
    x = torch.randn(8, 4096, generator=generator)
    x[:, 7] *= 50
    expected = x.double() @ ops.dequantize_int8(weight, scale).double().T
    fp32_error = ((x @ ops.dequantize_int8(weight, scale).T).double() - expected).abs().max()
    error = (ops.int8_weight_only_mm(x, weight, scale).double() - expected).abs().max()
    assert error <= 8 * fp32_error


def test_a_row_with_inf_or_nan_gives_nan_and_tiny_rows_keep_their_precision():
    weight, scale = quantize_int8(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    x[1, 5], x[2, 9] = float("nan"), float("inf")
    y = ops.int8_weight_only_mm(x, weight, scale)
    assert bool(torch.isfinite(y[0]).all()) and not bool(torch.isfinite(y[1:]).any())
    tiny = torch.randn(2, 256, generator=torch.Generator().manual_seed(2)) * 1e-38
    assert close(ops.int8_weight_only_mm(tiny, weight, scale).double(),
                 tiny.double() @ ops.dequantize_int8(weight, scale).double().T)


def test_the_ops_pass_a_gradient_and_refuse_shapes_they_cannot_take():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 256, requires_grad=True)
    int8 = quantize_int8(weight)
    ops.int8_weight_only_mm(x, *int8).sum().backward()
    assert torch.allclose(x.grad, ops.dequantize_int8(*int8).sum(0).expand(2, -1), atol=1e-4)
    int4 = pack_int4(weight, 64)
    x.grad = None
    ops.int4_weight_only_mm(x, *int4, 64).sum().backward()
    assert torch.allclose(x.grad, ops.dequantize_int4(*int4, 64).sum(0).expand(2, -1), atol=1e-4)
    with pytest.raises(RuntimeError, match="weight must be int8 \\[N, K\\] with x's K = 100"):
        ops.int8_weight_only_mm(torch.randn(2, 100), *int8)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 32 dividing K = 256, got 96"):
        ops.int4_weight_only_mm(torch.randn(8, 256), *int4, 96)


def test_the_formats_hold_the_weights_within_half_a_step():
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and bool(((ops.dequantize_int8(q, scale) - weight).abs() <= scale[:, None] / 2 + 1e-6).all())
    packed, scale, offset = pack_int4(weight, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and scale.shape == (24, 4)
    error = (ops.dequantize_int4(packed, scale, offset, 64) - weight).abs().view(24, 4, 64)
    assert bool((error <= scale[..., None] / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="int4 needs in_features divisible by the group size 64, got 100"):
        pack_int4(torch.randn(4, 100), 64)


def test_int8_holds_the_weights_torchaos_int8wo_holds():
    """The same int8 values and scales as torchao's int8wo: the two backends differ by their kernels only."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 96, bias=False)
    q, scale = quantize_int8(linear.weight)
    quantize_(linear, Int8WeightOnlyConfig())
    assert torch.equal(q, linear.weight.qdata) and torch.equal(scale, linear.weight.scale.flatten())


def test_layers_take_any_leading_dims_and_a_bias_and_compile_whole():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48)
    x = torch.randn(2, 3, 128)
    for layer, weight in [(Int8Linear.from_linear(linear), None), (Int4Linear.from_linear(linear, 64), None)]:
        dequantized = ops.dequantize_int8(layer.weight, layer.scale) if isinstance(layer, Int8Linear) else \
            ops.dequantize_int4(layer.packed, layer.scale, layer.offset, 64)
        expected = torch.nn.functional.linear(x, dequantized, linear.bias).detach()
        with torch.no_grad():
            assert close(layer(x), expected)
            torch._dynamo.reset()
            assert close(torch.compile(layer, fullgraph=True)(x), expected)  # fullgraph: no break at the op


def attention_case(rows, length, heads, kv_heads, head_dim, context=70, seed=0):
    generator = torch.Generator().manual_seed(seed)
    slots = max(rows, 5)
    caches = [torch.randn(slots, kv_heads, context, head_dim, generator=generator) for _ in range(2)]
    q = torch.randn(rows, length, heads, head_dim, generator=generator)
    row_slots = torch.randperm(slots, generator=generator)[:rows]
    positions = torch.randint(0, context, (rows, length), generator=generator)
    if rows:
        positions[0, 0], positions[-1, -1] = 0, context - 1  # the first position alone, and the whole context
    return q, *caches, row_slots, positions


def attention_reference(q, k_cache, v_cache, slots, positions):
    """The gathered attention in float64, each row up to its own position."""
    mask = torch.arange(k_cache.shape[2]) <= positions.unsqueeze(-1)
    return ops.gathered_attention(q.double(), k_cache.double(), v_cache.double(), slots, mask)


@pytest.mark.parametrize("rows, length, heads, kv_heads, head_dim", [
    (1, 1, 4, 4, 64), (8, 1, 16, 8, 64), (3, 5, 6, 2, 40), (2, 1, 4, 1, 17), (0, 1, 4, 2, 32), (2, 9, 8, 2, 40),
    (1, 64, 16, 8, 64)])
def test_cached_attention_equals_the_gathered_reference(rows, length, heads, kv_heads, head_dim):
    """Each row reads its own slot up to its own position: grouped heads, head_dim not a multiple of the lanes,
    several tokens a row (in loops, and from 16 query rows a kv head in two GEMMs), the first position alone, the
    whole context, no rows."""
    case = attention_case(rows, length, heads, kv_heads, head_dim)
    assert close(ops.cached_attention(*case).double(), attention_reference(*case))


@pytest.mark.parametrize("rows, length, heads, kv_heads, head_dim", [
    (1, 1, 4, 4, 64), (8, 1, 16, 8, 64), (2, 1, 4, 1, 17), (0, 1, 4, 2, 32), (1, 64, 16, 8, 64)])
def test_cached_attention_over_a_bf16_cache_equals_the_reference_on_its_values(rows, length, heads, kv_heads,
                                                                               head_dim):
    """A bf16 KV cache is read as its values widened to fp32 (exactly), with fp32 queries and sums: in loops, in the
    GEMMs, an odd head_dim, no rows."""
    q, k_cache, v_cache, slots, positions = attention_case(rows, length, heads, kv_heads, head_dim)
    case = (q, k_cache.bfloat16(), v_cache.bfloat16(), slots, positions)
    out = ops.cached_attention(*case)
    assert out.dtype == torch.float32
    assert close(out.double(), attention_reference(*case))


def test_cached_attention_ignores_what_lies_past_a_rows_position_and_keeps_other_dtypes():
    q, k_cache, v_cache, slots, positions = attention_case(3, 1, 4, 2, 32)
    expected = ops.cached_attention(q, k_cache, v_cache, slots, positions)
    for cache in (k_cache, v_cache):  # another sequence's leftovers past each row's position
        for slot, position in zip(slots.tolist(), positions[:, 0].tolist()):
            cache[slot, :, position + 1:] = 1e4
    assert torch.equal(ops.cached_attention(q, k_cache, v_cache, slots, positions), expected)
    half = ops.cached_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), slots, positions)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=3e-2)


def test_cached_attention_gives_nan_only_to_a_row_with_nan_and_refuses_what_it_cannot_read():
    q, k_cache, v_cache, slots, positions = attention_case(3, 1, 4, 2, 32)
    q[1, 0, 2, 5] = float("nan")  # head 2 shares kv head 1 with head 3: both of its heads' outputs may be NaN
    out = ops.cached_attention(q, k_cache, v_cache, slots, positions)
    assert bool(torch.isnan(out[1, 0, 2]).all()) and bool(torch.isfinite(out[[0, 2]]).all())
    assert bool(torch.isfinite(out[1, 0, :2]).all())
    with pytest.raises(RuntimeError, match="slot 9 of row 0 is not in \\[0, 5\\)"):
        ops.cached_attention(q, k_cache, v_cache, torch.tensor([9, 0, 1]), positions)
    with pytest.raises(RuntimeError, match="position 70 of row 2 is not in \\[0, 70\\)"):
        ops.cached_attention(q, k_cache, v_cache, slots, torch.tensor([[1], [2], [70]]))
    with pytest.raises(RuntimeError, match="kv heads divide q's 4 heads"):
        ops.cached_attention(q, k_cache[:, :1].repeat(1, 3, 1, 1), v_cache[:, :1].repeat(1, 3, 1, 1), slots,
                             positions)


def test_cached_attention_compiles_as_one_call():
    case = attention_case(4, 1, 8, 4, 64)
    torch._dynamo.reset()
    compiled = torch.compile(ops.cached_attention, fullgraph=True, dynamic=True)
    assert close(compiled(*case).double(), attention_reference(*case))


def test_swap_leaves_what_int4_cannot_take_in_float(caplog):
    module = torch.nn.Sequential(torch.nn.Linear(128, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8),
                                 torch.nn.Linear(8, 128))
    assert swap_linears(module, "int4", 32, skip={"3"}) == ["0"]
    assert [type(layer).__name__ for layer in module] == ["Int4Linear", "ReLU", "Linear", "Linear"]
    assert "2 stays in float: int4 needs in_features divisible by the group size 32, it has 40" in caplog.text
    with pytest.raises(ValueError, match="Unknown weight format 'int2'"):
        swap_linears(module, "int2")


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_backend_round_trips_through_a_weights_only_checkpoint(weight_format, compiled, tmp_path):
    from aitune_core.backends import backend_from_dict
    from aitune_core.backends.weight_only import WeightOnlyBackend, WeightOnlyBackendConfig
    from aitune_core.checkpoint import load_checkpoint, save_checkpoint

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64))

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    reference = mlp()(x).detach()
    config = WeightOnlyBackendConfig(weight_format=weight_format, group_size=64, compile=compiled)
    built = WeightOnlyBackend(config).build(mlp(), None, [x], "cpu")
    output = built.infer(x)
    cosine = float(torch.nn.functional.cosine_similarity(output.flatten(), reference.flatten(), dim=0))
    assert cosine > (0.9999 if weight_format == "int8" else 0.995) and not torch.equal(output, reference)
    state = built.to_dict()
    assert {str(tensor.dtype) for tensor in state["weights"].values()} == \
        {"torch.float32", "torch.int8" if weight_format == "int8" else "torch.uint8"}
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = backend_from_dict(mlp(), load_checkpoint(tmp_path / "checkpoint.pt"))
    loaded.deploy("cpu")
    assert torch.equal(loaded.infer(x), output)
    assert loaded.key() == built.key() and loaded.describe() == built.describe()
