"""The checkpoint format: bit-exact round trips, atomic writes, and clear errors for bad files."""

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from comfyui_svdquant.svdquant import layer_io
from comfyui_svdquant.svdquant.checkpoint import CheckpointReader, QuantizationInfo, write_checkpoint
from comfyui_svdquant.svdquant.errors import CheckpointError
from comfyui_svdquant.svdquant.quantizer import InputStats, QuantizeConfig, quantize_linears, quantize_w4a16


def quantized_layer(precision="int4", k=256, n=128, rank=32):
    torch.manual_seed(0)
    x = torch.randn(256, k).bfloat16()
    stats = InputStats("l", k)
    stats.update(x)
    (q,) = quantize_linears([("l", torch.randn(n, k) * 0.05, torch.randn(n))], stats,
                            QuantizeConfig(precision=precision, rank=rank, smooth_grid=(0.5,)))
    return q.module(), x


def write_layer(path, layer, info, prefix="blocks.0.qkv", extra=None, drop=(), change=None):
    tensors = layer_io.layer_state(layer, prefix)
    for key in drop:
        del tensors[f"{prefix}.{key}"]
    for key, value in (change or {}).items():
        tensors[f"{prefix}.{key}"] = value
    tensors.update(extra or {})
    write_checkpoint(path, tensors, {"quantization_config": info.to_json(), "model_class": "Test"})


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_layer_round_trip_is_bit_exact(tmp_path, precision):
    layer, x = quantized_layer(precision)
    info = QuantizationInfo(precision, 32)
    path = tmp_path / "model.safetensors"
    write_layer(path, layer, info)
    with CheckpointReader(path) as reader:
        assert reader.quantization() == info
        assert "blocks.0.qkv.lora_down" in reader and "blocks.0.qkv.smooth" in reader  # C++-style names
        loaded = layer_io.read_w4a4(reader, "blocks.0.qkv", 256, 128, info)
    for name, value in layer.state_dict().items():
        other = loaded.state_dict()[name]
        assert other.dtype == value.dtype and torch.equal(other.view(torch.uint8), value.view(torch.uint8)), name
    assert torch.equal(loaded(x), layer(x))


def test_metadata_matches_the_published_quantization_config():
    assert json.loads(QuantizationInfo("int4", 32).to_json()) == {
        "method": "svdquant",
        "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
        "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
        "rank": 32,
    }
    fp4 = json.loads(QuantizationInfo("nvfp4", 32).to_json())
    assert fp4["weight"] == {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    assert fp4["activation"]["scale_dtype"] == "fp8_e4m3_nan"


def test_safetensors_library_reads_our_files(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.rand(4).to(torch.float8_e4m3fn), "d": torch.zeros(2, 0)}
    write_checkpoint(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = load_file(tmp_path / "x.safetensors")
    for key, value in tensors.items():
        assert torch.equal(back[key].view(torch.uint8) if value.numel() else back[key],
                           value.view(torch.uint8) if value.numel() else value)


def test_failed_write_leaves_nothing(tmp_path):
    class Boom(torch.Tensor):
        def to(self, *args, **kwargs):
            raise RuntimeError("interrupted")

    tensors = {"ok": torch.ones(4), "bad": torch.ones(4).as_subclass(Boom)}
    with pytest.raises(RuntimeError, match="interrupted"):
        write_checkpoint(tmp_path / "model.safetensors", tensors, {})
    assert os.listdir(tmp_path) == []


def test_existing_file_survives_a_failed_overwrite(tmp_path):
    path = tmp_path / "model.safetensors"
    write_checkpoint(path, {"a": torch.ones(2)}, {"v": "1"})

    class Boom(torch.Tensor):
        def to(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(path, {"a": torch.ones(2).as_subclass(Boom)}, {"v": "2"})
    assert CheckpointReader(path).metadata == {"v": "1"}
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_corrupt_and_foreign_files(tmp_path):
    layer, _ = quantized_layer()
    good = tmp_path / "good.safetensors"
    write_layer(good, layer, QuantizationInfo("int4", 32))
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors: the file is truncated: its header describes"):
        CheckpointReader(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(random.Random(0).randbytes(1000))  # fixed: 1 in 256 random files looks like a header
    with pytest.raises(CheckpointError, match="garbage.safetensors.*(truncated|not a)"):
        CheckpointReader(garbage)

    pickled = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, pickled)
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(pickled)

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match="GGUF"):
        CheckpointReader(gguf)

    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointReader(tmp_path / "missing.safetensors")

    # a header length as large as the file (200 MB of spaces after it) is refused before it is read
    crafted = tmp_path / "crafted.safetensors"
    with open(crafted, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000) + b"{")
        f.truncate(8 + 200_000_000)  # sparse: no disk space used
    with pytest.raises(CheckpointError, match="crafted.safetensors: the .safetensors header claims 200000000 bytes"):
        CheckpointReader(crafted)


def test_missing_or_inconsistent_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.safetensors.*'quantization_config' is missing"):
        CheckpointReader(plain).quantization()

    def with_config(text):
        path = tmp_path / "meta.safetensors"
        save_file({"w": torch.ones(2)}, path, metadata={"quantization_config": text})
        return CheckpointReader(path)

    with pytest.raises(CheckpointError, match="not valid SVDQuant JSON"):
        with_config("{not json").quantization()
    bad_group = json.loads(QuantizationInfo("int4", 32).to_json())
    bad_group["weight"]["group_size"] = 128
    with pytest.raises(CheckpointError, match="group size 128"):
        with_config(json.dumps(bad_group)).quantization()
    bad_rank = json.loads(QuantizationInfo("int4", 32).to_json())
    bad_rank["rank"] = 20
    with pytest.raises(CheckpointError, match="rank 20"):
        with_config(json.dumps(bad_rank)).quantization()
    other = json.loads(QuantizationInfo("int4", 32).to_json())
    other["weight"]["dtype"] = "int8"
    with pytest.raises(CheckpointError, match="int8"):
        with_config(json.dumps(other)).quantization()


def test_layer_checks_name_the_tensor(tmp_path):
    layer, _ = quantized_layer()
    info = QuantizationInfo("int4", 32)
    path = tmp_path / "m.safetensors"
    cases = [
        (dict(drop=["wscales"]), "'blocks.0.qkv.wscales' is missing"),
        (dict(drop=["lora_up"]), "lora_down' is present but 'blocks.0.qkv.lora_up' is missing"),
        (dict(change={"qweight": torch.zeros(128, 64, dtype=torch.int8)}), "qweight' has shape \\[128, 64\\]"),
        (dict(change={"smooth": torch.ones(256)}), "smooth' is float32"),
        (dict(change={"bias": torch.full((128,), float("nan")).bfloat16()}), "bias' contains NaN"),
    ]
    for kwargs, message in cases:
        write_layer(path, layer, info, **kwargs)
        with CheckpointReader(path) as reader, pytest.raises(CheckpointError, match=message):
            layer_io.read_w4a4(reader, "blocks.0.qkv", 256, 128, info)
    write_layer(path, layer, info)
    with CheckpointReader(path) as reader:
        with pytest.raises(CheckpointError, match="rank 32, but the metadata's 'quantization_config' says rank 64"):
            layer_io.read_w4a4(reader, "blocks.0.qkv", 256, 128, QuantizationInfo("int4", 64))
        with pytest.raises(CheckpointError, match="metadata says the checkpoint is nvfp4"):
            layer_io.read_w4a4(reader, "blocks.0.qkv", 256, 128, QuantizationInfo("nvfp4", 32))
        with pytest.raises(CheckpointError, match="a 512→128 SVDQuant layer"):
            layer_io.read_w4a4(reader, "blocks.0.qkv", 512, 128, info)


def test_w4a16_round_trip_and_folder_layout(tmp_path):
    torch.manual_seed(0)
    mod = quantize_w4a16("norm1.linear", torch.randn(384, 256) * 0.02, torch.randn(384))
    layer, x = quantized_layer()
    folder = tmp_path / "svdq-int4-model"
    folder.mkdir()
    blocks = dict(layer_io.layer_state(layer, "transformer_blocks.0.qkv_proj"))
    blocks.update(layer_io.layer_state(mod, "transformer_blocks.0.norm1.linear"))
    write_checkpoint(folder / "transformer_blocks.safetensors", blocks, {})
    write_checkpoint(folder / "unquantized_layers.safetensors", {"x_embedder.weight": torch.ones(4, 4)}, {})
    (folder / "config.json").write_text(json.dumps({"num_layers": 1}))
    with CheckpointReader(folder) as reader:
        assert reader.quantization() == QuantizationInfo("int4", 32)  # inferred from the tensors
        assert reader.json("config") == {"num_layers": 1}
        back = layer_io.read_w4a16(reader, "transformer_blocks.0.norm1.linear", 256, 384)
        assert torch.equal(back(x), mod(x))
        assert torch.equal(reader.get("x_embedder.weight"), torch.ones(4, 4))
    (folder / "unquantized_layers.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing unquantized_layers.safetensors"):
        CheckpointReader(folder)
