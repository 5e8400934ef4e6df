"""The billing domain: quantities and money, meters, usage validation, pricing, budgets and invoices (no grpc)."""
