"""The billing service: exactly-once metering, price book, budgets and invoices."""
