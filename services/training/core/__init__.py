"""The training service's domain: jobs and their lifecycle, the executor, base models and the model registry."""
