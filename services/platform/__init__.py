"""The local platform: `aidc up` runs every service, Triton, the object store and the trace collector."""
