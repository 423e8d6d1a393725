"""The base checkpoint (`base` stage): loading and materialising checkpoints (packaged GGUF, hub,
local, tiny from scratch), precision, and the tiny base's brief pretraining."""
