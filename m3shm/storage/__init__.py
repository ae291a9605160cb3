"""Durable storage: the commit log now; namespaces, filesets and the reverse index later."""
