"""The training service's domain: jobs and their runs in the scheduler (submission, following, the runner's output),
base models and the model registry."""
