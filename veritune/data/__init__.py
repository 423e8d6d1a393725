"""The data stages' logic: the raw corpus checked against its contract (`validate`), split by
document (`split`), and turned into RAFT-style training conversations (`build_sft`)."""
