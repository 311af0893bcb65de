"""Request intake: how the agent learns which requests ran, when, where and with how many
tokens (the ingest API and its client; the OpenAI-compatible proxy; server scrapers)."""
