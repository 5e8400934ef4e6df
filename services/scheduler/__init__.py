"""The scheduler service: resource pools, quotas, the job queue, placement and executors."""
