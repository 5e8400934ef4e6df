"""aidc: the mesh services, their shared runtime (mesh), and the CLI."""
