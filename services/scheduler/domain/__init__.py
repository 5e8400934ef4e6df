"""The scheduler service's domain around the policy core: jobs and their runs, the cycle, the inventory of pools,
nodes and quotas, budget answers, and batched persistence."""
