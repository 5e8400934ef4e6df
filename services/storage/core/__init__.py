"""The storage domain: names, envelope encryption, text datasets, transfers; no gRPC here."""
