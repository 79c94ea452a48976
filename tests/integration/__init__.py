"""End-to-end tests: a real Server on 127.0.0.1, real sockets, real files."""
