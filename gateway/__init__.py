"""Switchyard's stateless HTTP front: OpenAI-compatible API over Redis Streams."""
