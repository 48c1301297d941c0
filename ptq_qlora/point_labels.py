"""Row names of evaluated points, written by the stages and read back by the report.

    SFT-16bit                        the stage-1 model
    PTQ-<METHOD>[-<VARIANT>]-<B>bit  its PTQ (PTQ-BNB-4bit, PTQ-BNB-FP4-4bit, PTQ-GPTQ-3bit, ...)
    <PTQ label>+QLoRA                QLoRA on that PTQ model
    ... (no SFT)                     the same points of the ablation that quantizes the *base* model

The "(no SFT)" marker goes last, so a QLoRA label is always its PTQ label's core + "+QLoRA" and the
report keeps the ablation's rows apart from the SFT-based rows of the same quantizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

QLORA = "+QLoRA"
NO_SFT = " (no SFT)"
_PTQ = re.compile(r"^PTQ-(?P<method>[A-Za-z0-9]+)(?:-(?P<variant>[A-Za-z0-9]+))?-(?P<bits>\d+)bit$")
_BITS = re.compile(r"-(\d+)bit\b")


@dataclass(frozen=True)
class PointLabel:
    text: str
    core: str  # without "+QLoRA" and the no-SFT marker: the quantizer's label, SFT-16bit, base, ...
    qlora: bool
    no_sft: bool
    method: str | None = None  # BNB, GPTQ, ... (PTQ labels only)
    variant: str | None = None  # FP4, ... (None: the method's default format)
    bits: int | None = None

    @property
    def is_ptq(self) -> bool:
        return self.method is not None

    @property
    def ptq(self) -> str:
        """The PTQ point this label's QLoRA (if any) was trained on, origin kept."""
        return self.core + (NO_SFT if self.no_sft else "")

    @property
    def with_sft(self) -> str:
        """The same point of the SFT-based chain."""
        return self.core + (QLORA if self.qlora else "")

    @property
    def family(self) -> str:
        """Method and variant without the bit width, e.g. PTQ-GPTQ, PTQ-BNB-FP4."""
        return "-".join(p for p in ("PTQ", self.method, self.variant) if p) if self.is_ptq else self.core


def parse(label: str) -> PointLabel:
    text = label
    no_sft = label.endswith(NO_SFT)
    label = label.removesuffix(NO_SFT)
    qlora = label.endswith(QLORA)
    core = label.removesuffix(QLORA)
    found = _PTQ.match(core)
    if not found:
        bits = _BITS.search(core)
        return PointLabel(text, core, qlora, no_sft, bits=int(bits.group(1)) if bits else None)
    return PointLabel(text, core, qlora, no_sft, found["method"].upper(),
                      found["variant"].upper() if found["variant"] else None, int(found["bits"]))


def ptq_label(quantizer_label: str, from_base: bool) -> str:
    return quantizer_label + (NO_SFT if from_base else "")


def qlora_label(ptq: str) -> str:
    parsed = parse(ptq)
    return parsed.core + QLORA + (NO_SFT if parsed.no_sft else "")
