"""Measuring the model: answer scoring and groundedness, the evaluation, RAG robustness and CSAT
stages, the optional LLM judge, the reports, and the release gate."""
