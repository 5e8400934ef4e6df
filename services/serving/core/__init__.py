"""The serving service's domain: deployments and their rollouts, independent of gRPC."""
