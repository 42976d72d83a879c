"""The audit log: the hash-chained store (log), its one writer (service), the replica client
(client), the wire between them (link), and its section of a deploy config (config)."""
