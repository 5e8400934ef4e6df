"""The auth domain: identities, tokens and the RBAC policy, free of gRPC."""
