"""The contract between Switchyard's gateway and workers: Redis names, wire messages, Lua scripts,
settings, tenant records and the fleet's state. Nothing here imports the gateway, the worker or the
control plane."""
