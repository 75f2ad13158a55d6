"""Switchyard worker: pulls jobs from Redis Streams and runs them on an in-process engine."""
