"""Everything that carries the agent's results out of the process."""
