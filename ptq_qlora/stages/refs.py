"""A reference to a model one of the chain's points produced, and how to load it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ptq_qlora.runstore import StageRecord


@dataclass
class ModelRef:
    point: str  # base | sft | ptq | qlora | merge (QA-LoRA merged) | input
    label: str  # row name in reports: SFT-16bit, PTQ-BNB-4bit, PTQ-BNB-4bit+QLoRA, ...
    lineage: str
    model_path: str  # folder (or Hub id) of the weights, quantized ones for ptq/qlora
    quantizer: Optional[dict] = None  # the quantizer config that made model_path (ptq/qlora)
    adapter_path: Optional[str] = None  # qlora: the LoRA adapter over model_path
    record: Optional[StageRecord] = None

    @property
    def quantized(self) -> bool:
        return bool(self.quantizer) and self.quantizer.get("method", "none") != "none"

    def to_json(self) -> dict:
        return {
            "point": self.point, "label": self.label, "lineage": self.lineage,
            "model_path": self.model_path, "quantizer": self.quantizer, "adapter_path": self.adapter_path,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModelRef":
        return cls(**{k: data.get(k) for k in ("point", "label", "lineage", "model_path", "quantizer", "adapter_path")})


REF_FILE = "model_ref.json"


def save_ref(folder: Path, ref: ModelRef) -> None:
    (folder / REF_FILE).write_text(json.dumps(ref.to_json(), indent=2))


def ref_from_stage_folder(record: StageRecord) -> ModelRef:
    """The model a completed sft/ptq/qlora stage folder holds (paths are stored relative to it so
    a store can be moved)."""
    data = json.loads((record.path / REF_FILE).read_text())
    ref = ModelRef.from_json(data)
    ref.model_path = str((record.path / ref.model_path).resolve()) if not Path(ref.model_path).is_absolute() else ref.model_path
    if ref.adapter_path and not Path(ref.adapter_path).is_absolute():
        ref.adapter_path = str((record.path / ref.adapter_path).resolve())
    ref.record = record
    return ref
