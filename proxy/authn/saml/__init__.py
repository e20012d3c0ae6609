"""SAML 2.0 service provider: SP-initiated login (redirect binding), ACS (POST binding).

`SamlSpConfig` (configuration) -> `ServiceProvider.load()` (built once) -> `saml_app()`
(the aiohttp sub-application). The state shared between workers (outstanding request ids,
seen assertion ids) sits behind `SamlStateStore`: `RedisSamlStore` or `InProcessSamlStore`.
"""

from proxy.authn.saml.app import LoginCallback, saml_app
from proxy.authn.saml.config import RoleMapping, SamlConfigError, SamlSpConfig
from proxy.authn.saml.provider import ServiceProvider
from proxy.authn.saml.returnto import UnsafeReturnTo, local_return_path
from proxy.authn.saml.state import InProcessSamlStore, RedisSamlStore, SamlStateStore

__all__ = [
    "InProcessSamlStore",
    "LoginCallback",
    "RedisSamlStore",
    "RoleMapping",
    "SamlConfigError",
    "SamlSpConfig",
    "SamlStateStore",
    "ServiceProvider",
    "UnsafeReturnTo",
    "local_return_path",
    "saml_app",
]
