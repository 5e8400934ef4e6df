"""The auth service: tenants, identities, tokens, RBAC (Casbin) and the audit log."""
