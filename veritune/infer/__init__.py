"""Decoding: the one decoder every generating consumer uses (evaluation, the agent, CSAT, the
server), with one per-row constraint interface, and the tool-call grammar that implements it."""
