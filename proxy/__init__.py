"""Authorization proxy: listener -> tls -> authn -> authz -> forward -> audit -> tap."""
