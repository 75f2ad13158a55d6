"""Switchyard's load tests and benchmarks, one study each: ``python -m loadtest STUDY [args...]``."""
