"""The control plane: the `switchyard` command, the one-machine supervisor, start-up checks, status
and administration. It sits above gateway/ and worker/ (and shared/, their contract) and is never
imported by them."""
