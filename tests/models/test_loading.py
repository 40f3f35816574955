"""Each half loads exactly its own tensors, from one file or shards, and names what is missing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from mmdisagg.models.base import EncoderHalf, LanguageHalf
from mmdisagg.models.weights import MissingWeightError
from tests.models.fixtures import TinyModel, encode, generate_greedy, split_greedy

TEXT_ONLY = [{"role": "user", "content": "How many people are in the picture?"}]


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def copy_with(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The checkpoint folder at ``source`` with other weights."""
    shutil.copytree(source, target)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def named(names: set[str], *suffixes: str) -> str | None:
    """The one checkpoint tensor name ending in one of ``suffixes`` (the Hub layouts differ:
    Qwen2-VL's ``visual.*``, ``model.*``; Qwen3-VL's ``model.visual.*``,
    ``model.language_model.*``)."""
    found = [name for name in names if name.endswith(suffixes)]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_each_half_holds_only_its_own_weights(tiny: TinyModel) -> None:
    names = set(checkpoint_tensors(tiny.path))
    vision = {name for name in names if name.startswith(("visual.", "model.visual."))}
    embeddings = {named(names, "model.embed_tokens.weight", "language_model.embed_tokens.weight")}
    assert set(tiny.encoder.loaded_weights) == vision | embeddings
    assert set(tiny.language.loaded_weights) == names - vision
    assert {"lm_head.weight", named(names, "model.norm.weight", "language_model.norm.weight")
            } <= set(tiny.language.loaded_weights)


def test_halves_allocate_nothing_beyond_the_loaded_weights(tiny: TinyModel) -> None:
    encoder_modules = (tiny.encoder.vision_tower, tiny.encoder.embed_tokens)
    language_modules = (tiny.language.text_model, tiny.language.lm_head)
    for modules, half in ((encoder_modules, tiny.encoder), (language_modules, tiny.language)):
        parameters = {id(p): p for module in modules for p in module.parameters()}
        assert all(p.device.type == "cpu" for p in parameters.values())
        held = sum(p.numel() for p in parameters.values())
        assert held == sum(t.numel() for t in half.loaded_weights.values())


@pytest.mark.parametrize("suffixes, needed_by", [
    (("layers.1.mlp.down_proj.weight",), LanguageHalf),
    (("lm_head.weight",), LanguageHalf),
    (("merger.mlp.2.weight", "visual.merger.linear_fc2.weight"), EncoderHalf),
    (("deepstack_merger_list.1.linear_fc2.weight",), EncoderHalf),
    (("embed_tokens.weight",), EncoderHalf),
])
def test_missing_weight_is_named(tiny: TinyModel, tmp_path: Path, suffixes: tuple[str, ...],
                                 needed_by: type) -> None:
    tensors = checkpoint_tensors(tiny.path)
    missing = named(set(tensors), *suffixes)
    if missing is None:
        pytest.skip(f"{tiny.family} has no {suffixes[0]}")
    del tensors[missing]
    path = copy_with(tiny.path, tmp_path / "broken", tensors)
    other = LanguageHalf if needed_by is EncoderHalf else EncoderHalf
    if not missing.endswith("embed_tokens.weight"):
        other.from_pretrained(path)  # the other half does not need it
    with pytest.raises(MissingWeightError, match=rf"no tensor .*'{re.escape(missing)}'") as caught:
        needed_by.from_pretrained(path)
    assert "needs" in str(caught.value)


def test_sharded_checkpoint(tiny: TinyModel, tmp_path: Path) -> None:
    tensors = checkpoint_tensors(tiny.path)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    shutil.copytree(tiny.path, tmp_path / "sharded", ignore=shutil.ignore_patterns("*.safetensors"))
    path = tmp_path / "sharded"
    for file, shard in shards.items():
        save_file({name: tensors[name] for name in shard}, path / file, metadata={"format": "pt"})
    index = {"weight_map": {name: file for file, shard in shards.items() for name in shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = TinyModel(tiny.family, path, EncoderHalf.from_pretrained(path),
                        LanguageHalf.from_pretrained(path), tiny.reference)
    assert torch.equal(encode(sharded, TEXT_ONLY).embeddings, encode(tiny, TEXT_ONLY).embeddings)
    assert split_greedy(sharded, encode(sharded, TEXT_ONLY), 8) == \
        split_greedy(tiny, encode(tiny, TEXT_ONLY), 8)


def test_in_memory_tensor_names_load_too(tiny: TinyModel, tmp_path: Path) -> None:
    """Checkpoints written with transformers 5's module names (model.language_model.*)."""
    if tiny.family == "qwen3_vl":
        pytest.skip("Qwen3-VL's Hub layout is already transformers 5's module names")
    renamed = {}
    for name, tensor in checkpoint_tensors(tiny.path).items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = name.replace("model.", "model.language_model.", 1)
        renamed[name] = tensor
    path = copy_with(tiny.path, tmp_path / "renamed", renamed)
    language = LanguageHalf.from_pretrained(path)
    assert "model.language_model.norm.weight" in language.loaded_weights
    assert len(EncoderHalf.from_pretrained(path).loaded_weights) == \
        len(tiny.encoder.loaded_weights)


def test_tied_word_embeddings(tiny: TinyModel, tmp_path: Path) -> None:
    tensors = checkpoint_tensors(tiny.path)
    del tensors["lm_head.weight"]
    path = copy_with(tiny.path, tmp_path / "tied", tensors)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = TinyModel(tiny.family, path, EncoderHalf.from_pretrained(path),
                     LanguageHalf.from_pretrained(path),
                     AutoModelForImageTextToText.from_pretrained(path))
    assert tied.language.lm_head.weight is tied.language.text_model.embed_tokens.weight
    assert split_greedy(tied, encode(tied, TEXT_ONLY), 10) == \
        generate_greedy(tied, TEXT_ONLY, 10).tokens


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        LanguageHalf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="'llava' is not supported"):
        EncoderHalf.from_pretrained(tmp_path)


def test_chat_template_from_the_processor_file(tiny: TinyModel, tmp_path: Path) -> None:
    path = tmp_path / "processor_template"
    shutil.copytree(tiny.path, path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        EncoderHalf.from_pretrained(path)
    LanguageHalf.from_pretrained(path)  # generating needs no template
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    prepared = EncoderHalf.from_pretrained(path).prepare(TEXT_ONLY)
    assert prepared.token_ids.tolist() == tiny.encoder.prepare(TEXT_ONLY).token_ids.tolist()


@pytest.mark.parametrize("dtype", ["int8", "float33", torch.int32])
def test_bad_dtype(tiny: TinyModel, dtype: object) -> None:
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        LanguageHalf.from_pretrained(tiny.path, dtype=dtype)
