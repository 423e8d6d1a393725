"""Stage `train`: LoRA (CPU) or QLoRA nf4 (GPU) supervised fine-tuning with TRL + PEFT.

    python stages/train.py

Reads models/base/, data/sft/{train,val}.jsonl and params `train`; writes the PEFT adapter
to models/adapter/ (with train_config.json), metrics/train.json and the DVCLive training
curves under metrics/train/. A killed run resumes from models/checkpoints/ when rerun.
With several GPUs it reruns itself under torchrun (one process per GPU, DDP); rank 0 writes.
"""

import logging
import shutil
from pathlib import Path

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json
from veritune.train.training import is_main_process, launch_data_parallel, train_adapter

log = logging.getLogger("veritune.train")

CHECKPOINTS = Path("models/checkpoints")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("train")
    if launch_data_parallel(__file__, p):
        return
    train_examples = read_jsonl("data/sft/train.jsonl")
    val_examples = read_jsonl("data/sft/val.jsonl")
    if not is_main_process():  # other data-parallel ranks train alongside; rank 0 writes
        train_adapter(Path("models/base"), train_examples, val_examples, p, None, CHECKPOINTS)
        return
    with atomic_path("models/adapter") as out:
        summary = train_adapter(
            Path("models/base"), train_examples, val_examples, p, out, CHECKPOINTS, live_dir=Path("metrics/train")
        )
        # What the adapter was trained against (nf4 or full weights): the export stage merges onto that.
        write_json(out / "train_config.json", {**as_dict(p), "quantization_used": summary["quantization"]})
    write_json("metrics/train.json", summary)
    # The adapter is safely in place: checkpoints only served a resume of this run.
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    log.info("train: %s", summary)


if __name__ == "__main__":
    main()
