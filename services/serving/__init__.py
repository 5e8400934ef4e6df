"""The serving service: Triton deployments and the KServe v2 inference gateway."""
