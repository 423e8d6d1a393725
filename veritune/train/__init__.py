"""LoRA / QLoRA fine-tuning (`train` stage), its fused kernels, and the merged export (`export`)."""
