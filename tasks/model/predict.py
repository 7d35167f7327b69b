"""Classify notes with a trained adapter (base model + LoRA adapter in PEFT format).

A note is read the way training read it: de-identified with the training's settings (saved
with the adapter), tokenized into the same window, pooled the same way. ``NoteClassifier``
also splits the model where encrypted inference cuts it: ``vectors`` is everything up to the
classification head (run by whoever holds the note), ``head`` the last linear layer (which a
service can evaluate on encrypted vectors).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict

from clinical_fl.settings.data import DeidSettings
from tasks.data.deid import deidentifier
from tasks.errors import TaskInputError
from tasks.learning.batches import WindowCollator, chunking_for, note_windows
from tasks.model.build import LABELS_FILE, load_adapter, saved_deid, saved_model_settings
from tasks.model.windows import classification_head

# A note is text a clinician wrote: far below this. Longer input is refused, not truncated
# silently after de-identification has spent time on it.
MAX_NOTE_CHARS = 200_000


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)


class NoteClassifier:
    """A saved adapter ready to classify raw notes."""

    def __init__(self, adapter_dir: str | Path, base_model: str | None = None,
                 deid: DeidSettings | None = None) -> None:
        self.adapter_dir = Path(adapter_dir)
        self.model, self.tokenizer, self.labels, self.max_length = load_adapter(
            self.adapter_dir, base_model)
        self.chunking = chunking_for(saved_model_settings(self.adapter_dir, base_model))
        self.deid = deid or saved_deid(self.adapter_dir)
        self._head = classification_head(self.model, len(self.labels))
        # Everything that shapes a note's vector: weights, base model, window, pooling, deid.
        self.fingerprint = _fingerprint(self.model, [
            (self.adapter_dir / LABELS_FILE).read_text(), str(base_model),
            repr(sorted(vars(self.deid).items()))])

    @staticmethod
    def check_notes(texts: list[str]) -> None:
        """Each note is non-empty text of a sane length (before any model work)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TaskInputError(f"note {i}: expected text, got {type(text).__name__}")
            if not text.strip():
                raise TaskInputError(f"note {i} is empty")
            if len(text) > MAX_NOTE_CHARS:
                raise TaskInputError(f"note {i} has {len(text)} characters; at most "
                                     f"{MAX_NOTE_CHARS} are accepted")
            try:  # JSON can carry a lone surrogate, which no tokenizer or spaCy can read
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise TaskInputError(f"note {i} is not valid Unicode text") from None

    def deidentify(self, texts: list[str]) -> list[str]:
        """Checked notes with their PHI replaced by placeholders, as in training."""
        self.check_notes(texts)
        if not self.deid.enabled:
            return list(texts)
        return deidentifier(self.deid).redact_all(list(texts))

    @torch.inference_mode()
    def _run(self, texts: list[str], batch_size: int, vectors: bool = False
             ) -> tuple[np.ndarray | None, np.ndarray]:
        """(head inputs if ``vectors``, logits) of already de-identified notes."""
        inputs: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
            if args[0].ndim != 2:  # a decoder (GPT) applies its head to every token
                raise TaskInputError(
                    f"the {self.model.config.model_type} model applies its head to every "
                    "token, not to one vector per note; encrypted inference needs a head that "
                    "reads one vector per note (BERT-family encoders such as MiniLM)")
            inputs.append(args[0].detach())

        handle = self._head.register_forward_hook(keep) if vectors else None
        logits = []
        try:
            for start in range(0, len(texts), batch_size):
                logits.append(self.model(**self._batch(texts[start:start + batch_size]))
                              .logits.float())
        finally:
            if handle is not None:
                handle.remove()
        head_inputs = torch.cat(inputs).float().numpy() if vectors else None
        return head_inputs, torch.cat(logits).numpy()

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokens of ``texts`` as training read them: windows of whole notes, or truncated."""
        if self.chunking is None:
            return dict(self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                       padding=True, return_tensors="pt"))
        windows, _ = note_windows(self.tokenizer, texts, self.max_length, self.chunking)
        batch = WindowCollator(self.tokenizer)(
            [{"input_ids": w, "labels": 0} for w in windows])
        batch.pop("labels")
        return batch

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self._run(self.deidentify(texts), batch_size)[1]

    def vectors(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """What the head reads, one row per note (the encrypted path's plaintext)."""
        return self._run(self.deidentify(texts), batch_size, vectors=True)[0]

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as (weight: dimension x classes, bias: classes), float64."""
        weight = self._head.weight.detach().double().numpy().T.copy()
        bias = (self._head.bias.detach().double().numpy().copy() if self._head.bias is not None
                else np.zeros(weight.shape[1]))
        return weight, bias

    def predictions(self, logits: np.ndarray) -> list[Prediction]:
        probabilities = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1).numpy()
        return [Prediction(self.labels[int(row.argmax())], float(row.max()),
                           dict(zip(self.labels, map(float, row), strict=True)))
                for row in probabilities]

    def predict(self, texts: list[str], batch_size: int = 32) -> list[Prediction]:
        return self.predictions(self.logits(texts, batch_size))


def _fingerprint(model: torch.nn.Module, settings: list[str]) -> str:
    """SHA-256 of the adapter's weights and reading settings: client and service check they
    hold the same model before encrypted vectors from one meet the head of the other."""
    digest = hashlib.sha256("\n".join(settings).encode())
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()

