"""SAML 2.0 service provider: SP-initiated login (redirect binding), ACS (POST binding).

`SamlSpConfig` (configuration) -> `ServiceProvider.load()` (built once) -> `saml_app()`
(the aiohttp sub-application). The state shared between workers (outstanding request ids,
seen assertion ids) sits behind `SamlStateStore`: `RedisSamlStore` or `InProcessSamlStore`.
"""

# Nothing is imported here: the configuration (`config`) is read by every command, and
# pysaml2 with its XML schemas (`provider`, `app`) takes half a second to import, which
# only a proxy with SAML configured should pay. Import from the modules.
