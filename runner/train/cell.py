"""The description of one training cell, built once by the driver and carried unchanged to Tune and the workers."""
from __future__ import annotations

from dataclasses import dataclass

from runner.spec import TrainSpec


@dataclass(frozen=True)
class Cell:
    """One training cell (model × condition × seed) as the driver hands it to Tune and the workers."""
    cell_id: str
    seed: int
    train: TrainSpec          # with bf16 already resolved to True/False (never "auto")
    pairs: str                # parquet path of the condition's subset
    model_path: str
    model_id: str
    out_dir: str
    work_dir: str
    ref_cache: str
    chat_template: str | None = None
    system_prompt: str | None = None  # this cell's resolved train.system_prompt (its value's text)
    trust_remote_code: bool = False
    # The train unit's key. cell_id ends with it, so Ray Train's run and every work dir are the key's
    # own; checkpoints record it and a resume checks it (benchmarks and unit tests leave it empty).
    key: str = ""
    # Its optimizer steps (runner.train.doses.condition_steps); None: train.epochs passes over its pairs.
    steps: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainSpec):
            raise TypeError(f"Cell.train must be a TrainSpec, got {type(self.train).__name__}")
        if not isinstance(self.train.bf16, bool):
            raise ValueError("resolve train.bf16 before building a Cell "
                             "(runner.train.launch.bf16_enabled, once, in the driver)")


@dataclass(frozen=True)
class Group:
    """Cells trained by one worker group (one Tune trial): a lone cell, or LoRA cells of one base
    model trained together (runner.train.group), `per_forward` adapters' micro-batches per forward."""
    cells: tuple[Cell, ...]
    per_forward: int = 1
