"""The shared runtime of every aidc service: serving, interceptors, identity, errors, config, telemetry."""
