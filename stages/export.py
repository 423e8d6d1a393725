"""Stage `export`: the adapter merged into its base, one checkpoint for plain transformers.

    python stages/export.py

Reads models/base/, models/adapter/ (its train_config.json says whether training saw an nf4
base) and params `export`; writes models/merged/ (safetensors, config, tokenizer with the
chat template, merge_info.json) and metrics/export.json.
"""

import json
import logging
from pathlib import Path

from veritune.core.config import load_params
from veritune.core.io import atomic_path, write_json
from veritune.train.export import export_merged

log = logging.getLogger("veritune.export")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("export")
    adapter_dir = Path("models/adapter")
    trained = json.loads((adapter_dir / "train_config.json").read_text(encoding="utf-8"))
    quantization = trained.get("quantization_used", "none")
    if quantization == "nf4":
        log.info("export: the adapter was trained on nf4 weights; merging onto their de-quantised values")
    with atomic_path("models/merged") as out:
        info = export_merged(Path("models/base"), adapter_dir, out, quantization, p.dtype)
    write_json("metrics/export.json", info)


if __name__ == "__main__":
    main()
