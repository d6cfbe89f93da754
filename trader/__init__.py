"""trader: a hybrid RL + LLM trading daemon."""

__version__ = "0.1.0"
