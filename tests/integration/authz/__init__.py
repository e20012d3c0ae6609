"""Integration tests of authorization: hot reload, Redis convergence, the admin API."""
