"""The audit log: the hash-chained store (log), its one writer (service), the replica client (client)."""
