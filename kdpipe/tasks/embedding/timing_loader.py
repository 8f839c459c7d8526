"""What the timing worker (kdpipe.profiling.timing, engine "torch") loads for an embedding run's PyTorch eager figures.

The worker imports `load_for_timing` by name (the job's `loader`), so kdpipe.profiling stays free of task code: the
sentence-transformers folder as one SentenceEncoder (backbone -> pooling -> [projection] -> [normalize]) with eager
attention, the same computation the exported ONNX graph holds, so eager and onnxruntime time the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOADER = "kdpipe.tasks.embedding.timing_loader:load_for_timing"


def load_for_timing(model_dir: str) -> Any:
    """The SentenceEncoder of a sentence-transformers folder, in eval mode, eager attention (what the export traces)."""
    from kdpipe.tasks.embedding.encoder import load_encoder

    encoder, _ = load_encoder(Path(model_dir), attn_implementation="eager")
    return encoder.eval()
