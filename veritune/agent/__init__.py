"""The tool-using agent: the shop's database and tools, the agent loop and its policies, and the
agent tasks with their scoring (`agent_db`, `agent_eval`)."""
