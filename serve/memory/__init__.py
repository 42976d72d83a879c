"""Shared memory: the durable store (store), its one-writer deployment (service), the replica client (client) and the built-in tools."""
