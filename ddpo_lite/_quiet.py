"""Silence the library log lines that are known harmless for ddpo-lite, one message at a time.

Each rule names the logger that emits the line and a pattern of the message: nothing else from
that logger is hidden, and other loggers are not touched. `install()` is called by the command
line before any of these libraries is imported (a logger can be configured before its module
exists); library users keep every message.

The lines, and why they are harmless here:

- bitsandbytes, at import on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from
  kernels-community" (an optional kernel for 4-bit inference on the CPU; ddpo-lite uses 8-bit
  AdamW, never 4-bit matmuls).
- transformers, when torchvision is not installed: "`CLIPImageProcessor` requires torchvision (not
  installed); falling back to `CLIPImageProcessorPil`" (it then uses the PIL image processor;
  importing the reward modules names these classes even when no reward uses them).
- diffusers, on `model.to(dtype)`: "There are modules in UNet2DConditionModel that should be kept
  in float32: []" (the list is empty: no module needs float32; a non-empty list is still shown).
- diffusers, on `load_lora_weights` of a UNet-only LoRA: "No LoRA keys associated to CLIPTextModel
  found" (SD3's encoders: "CLIPTextModelWithProjection"; ddpo-lite trains the denoiser only; the text encoder having no LoRA keys is expected).
"""

from __future__ import annotations

import logging
import re

#: (logger name, regular expression a message must match to be dropped)
RULES: tuple[tuple[str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"^Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    (
        "transformers.utils.import_utils",
        r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`",
    ),
    (
        "diffusers.models.modeling_utils",
        r"^There are modules in \w+ that should be kept in float32: \[\]\.",
    ),
    (
        "diffusers.loaders.lora_base",
        r"^No LoRA keys associated to CLIPTextModel(WithProjection)? found",
    ),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Add the filters (once per logger and pattern)."""
    for name, pattern in RULES:
        logger = logging.getLogger(name)
        if not any(
            isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters
        ):
            logger.addFilter(_DropMatching(pattern))
