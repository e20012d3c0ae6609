"""The sidecar's own identity provider, for teams without one.

Users with bcrypt passwords (`users`), signing keys with RFC 7638 kids (`keys`), access
tokens and opaque refresh tokens (`tokens`), refresh-token rotation with reuse detection
and session revocation (`refresh`) and login rate limiting (`ratelimit`), both in Redis
or, for a single worker, in process; audit events (`events`); and the aiohttp
sub-application that serves them (`app`), configured by `config`.

The proxy trusts it like any other issuer: `IdentityProvider.issuer_config` and
`IdentityProvider.key_store` plug into `proxy.authn.jwt.validate`, and
`IdentityProvider.is_revoked(principal)` rejects access tokens of ended sessions.
"""

# Nothing is imported here, so `python -m proxy.authn.idp.users` and `.keys` run cleanly;
# import from the modules (`proxy.authn.idp.app.IdentityProvider`, ...).
