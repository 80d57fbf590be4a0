//! The tower layer that authenticates and authorizes every call of a gRPC
//! server (see the module comment of [`crate::auth`]).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use tonic::{Code, Status};

use super::{
    ADMIN_ROLE, API_KEY_HEADER, AuthConfig, KeyVerifier, PRINCIPAL_HEADER, Principal,
    jwt::{JwtVerifier, MAX_TOKEN_BYTES, SetupError},
    policy::{Policy, Rule},
};
use crate::{
    guard::{Gate, GateLayer},
    ratelimit::AuthFailures,
    status::error_info,
};

/// The credentials of a call.
#[derive(PartialEq, Eq)]
enum Credentials<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
}

/// Names the kind of credentials, never the token or key.
impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::Bearer(_) => "Bearer(<redacted>)",
            Credentials::ApiKey(_) => "ApiKey(<redacted>)",
        })
    }
}

/// Decides every call: who it comes from, and whether they may make it.
pub struct Authenticator {
    enabled: bool,
    policy: Policy,
    jwt: Option<JwtVerifier>,
    keys: Option<Arc<dyn KeyVerifier>>,
    /// Failed authentications per client address (none: not limited).
    failures: Option<Arc<AuthFailures>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("jwt", &self.jwt)
            .field("api_keys", &self.keys.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Nobody is asked for credentials; a client's own
    /// `x-eventfold-principal` is still removed.
    pub fn disabled() -> Authenticator {
        Authenticator { enabled: false, policy: Policy::default(), jwt: None, keys: None, failures: None }
    }

    /// Every call of an RPC in `policy` must authenticate with a JWT (as
    /// `config` says) or an API key (when `keys` is given) and hold one of
    /// the RPC's roles.
    pub fn new(config: &AuthConfig, policy: Policy, keys: Option<Arc<dyn KeyVerifier>>) -> Result<Self, SetupError> {
        let jwt = JwtVerifier::new(&config.jwt)?;
        if jwt.is_none() && keys.is_none() {
            return Err(SetupError::NoKeys);
        }
        Ok(Authenticator { enabled: true, policy, jwt, keys, failures: None })
    }

    /// Refuse calls with credentials from a client address that failed to
    /// authenticate more often than `failures` allows, without checking
    /// them (a flood of bad tokens or invented keys costs no signature
    /// check or database read once over the limit).
    pub fn limit_failures(mut self, failures: Arc<AuthFailures>) -> Self {
        self.failures = Some(failures);
        self
    }

    /// Whether calls must authenticate.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The principal of a call of `path` (`/package.Service/Method`) with
    /// `headers`: `None` when it needs none and brought none; a status
    /// when it is refused.
    pub async fn check(&self, path: &str, headers: &HeaderMap) -> Result<Option<Principal>, Status> {
        if !self.enabled {
            return Ok(None);
        }
        // Not in the policy: health checks and reflection (every eventfold
        // RPC has a rule, or the server does not start).
        let Some(rule) = self.policy.rule(path) else {
            return Ok(None);
        };
        let credentials = credentials(headers)?;
        let principal = match credentials {
            None if *rule == Rule::Public => return Ok(None),
            None => {
                return Err(error_info(
                    Code::Unauthenticated,
                    "credentials required: authorization: Bearer <JWT>, or x-api-key: <API key>",
                    "CREDENTIALS_MISSING",
                    &[],
                ));
            }
            Some(Credentials::Bearer(token)) => self.bearer(token).await?,
            Some(Credentials::ApiKey(key)) => self.api_key(key).await?,
        };
        if !rule.allows(&principal.roles) {
            let Rule::Roles(needed) = rule else {
                return Ok(Some(principal));
            };
            let needed = needed.join(", ");
            return Err(error_info(
                Code::PermissionDenied,
                format!("this call needs one of the roles {needed} (or {ADMIN_ROLE})"),
                "MISSING_ROLE",
                &[("roles", needed)],
            ));
        }
        Ok(Some(principal))
    }

    async fn bearer(&self, token: &str) -> Result<Principal, Status> {
        let Some(jwt) = &self.jwt else {
            return Err(error_info(
                Code::Unauthenticated,
                "this server does not accept bearer tokens; use an API key",
                "TOKENS_NOT_ACCEPTED",
                &[],
            ));
        };
        jwt.verify(token).await.map_err(|refusal| {
            let code =
                if refusal == super::jwt::Refusal::KeysUnavailable { Code::Unavailable } else { Code::Unauthenticated };
            error_info(code, refusal.to_string(), refusal.reason(), &[])
        })
    }

    async fn api_key(&self, key: &str) -> Result<Principal, Status> {
        let Some(keys) = &self.keys else {
            return Err(error_info(
                Code::Unauthenticated,
                "this server does not accept API keys; use a bearer token",
                "API_KEYS_NOT_ACCEPTED",
                &[],
            ));
        };
        match keys.verify(key).await {
            Ok(Some(principal)) => Ok(principal),
            Ok(None) => {
                Err(error_info(Code::Unauthenticated, "the API key is unknown or revoked", "API_KEY_INVALID", &[]))
            }
            Err(_) => Err(error_info(
                Code::Unavailable,
                "API keys cannot be checked now, retry later",
                "API_KEYS_UNAVAILABLE",
                &[],
            )),
        }
    }
}

/// The credentials in `headers`: `authorization: Bearer …` or
/// `authorization: ApiKey …`, else `x-api-key: …`.
fn credentials(headers: &HeaderMap) -> Result<Option<Credentials<'_>>, Status> {
    let malformed = || {
        error_info(
            Code::Unauthenticated,
            "the authorization header must be 'Bearer <JWT>' or 'ApiKey <key>'",
            "CREDENTIALS_MALFORMED",
            &[],
        )
    };
    fn text(value: &HeaderValue) -> Option<&str> {
        value.to_str().ok().map(str::trim).filter(|v| !v.is_empty() && v.len() <= MAX_TOKEN_BYTES)
    }
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = text(value).ok_or_else(malformed)?;
        let (scheme, rest) = value.split_once(' ').ok_or_else(malformed)?;
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(malformed());
        }
        return match scheme {
            s if s.eq_ignore_ascii_case("bearer") => Ok(Some(Credentials::Bearer(rest))),
            s if s.eq_ignore_ascii_case("apikey") => Ok(Some(Credentials::ApiKey(rest))),
            _ => Err(malformed()),
        };
    }
    match headers.get(API_KEY_HEADER) {
        Some(value) => Ok(Some(Credentials::ApiKey(text(value).ok_or_else(malformed)?))),
        None => Ok(None),
    }
}

/// Runs an [`Authenticator`] in front of a server's services.
pub type AuthLayer = GateLayer<Authenticator>;

impl Gate for Authenticator {
    const REFUSED: &'static str = "call refused by authentication";

    fn admit<'a>(&'a self, request: &'a mut http::request::Parts) -> BoxFuture<'a, Result<(), Status>> {
        Box::pin(async move {
            // Only the layer says who calls.
            request.headers.remove(PRINCIPAL_HEADER);
            let limited = self.failures.as_ref().filter(|_| self.enabled).and_then(|failures| {
                let credentials = request.headers.contains_key(http::header::AUTHORIZATION)
                    || request.headers.contains_key(API_KEY_HEADER);
                credentials.then(|| failures.client_ip(request).map(|ip| (failures, ip))).flatten()
            });
            if let Some((failures, ip)) = limited {
                failures.admit(ip)?;
            }
            let checked = self.check(request.uri.path(), &request.headers).await;
            if let (Err(status), Some((failures, ip))) = (&checked, limited)
                && status.code() == Code::Unauthenticated
            {
                failures.failed(ip);
            }
            if let Some(principal) = checked? {
                if let Ok(value) = HeaderValue::from_str(&principal.subject) {
                    request.headers.insert(PRINCIPAL_HEADER, value);
                }
                request.extensions.insert(principal);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use tonic::body::Body;
    use tonic_types::StatusExt;
    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::auth::{KeyError, Secret};

    const SECRET: &str = "a-test-secret-of-at-least-thirty-two-bytes";
    const CREATE_ORDER: &str = "/eventfold.orders.v1.OrderCommandService/CreateOrder";

    /// Keys: `good` is an `orders.write` key, `down` means the store is
    /// unavailable, anything else is unknown.
    struct Keys;

    impl KeyVerifier for Keys {
        fn verify<'a>(
            &'a self,
            key: &'a str,
        ) -> futures_util::future::BoxFuture<'a, Result<Option<Principal>, KeyError>> {
            Box::pin(async move {
                match key {
                    "good" => Ok(Some(Principal { subject: "apikey:ci".into(), roles: vec!["orders.write".into()] })),
                    "down" => Err(KeyError),
                    _ => Ok(None),
                }
            })
        }
    }

    fn authenticator() -> Authenticator {
        let mut config = AuthConfig::default();
        config.jwt.hs256_secret = Some(Secret::new(SECRET));
        let policy = Policy::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
        Authenticator::new(&config, policy, Some(Arc::new(Keys))).unwrap()
    }

    fn token(subject: &str, roles: &[&str]) -> String {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        let claims = serde_json::json!({"sub": subject, "roles": roles, "exp": exp});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn reason(status: &Status) -> String {
        status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn calls_are_refused_or_let_through_by_credentials_and_roles() {
        let auth = authenticator();
        let bearer = |t: &str| format!("Bearer {t}");
        let writer = bearer(&token("alice", &["orders.write"]));
        let reader = bearer(&token("bob", &["orders.read"]));
        let admin = bearer(&token("root", &["admin"]));
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Result<&'a str, (Code, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            (CREATE_ORDER, vec![], Err((Code::Unauthenticated, "CREDENTIALS_MISSING"))),
            (CREATE_ORDER, vec![("authorization", "Basic abc")], Err((Code::Unauthenticated, "CREDENTIALS_MALFORMED"))),
            (CREATE_ORDER, vec![("authorization", "Bearer")], Err((Code::Unauthenticated, "CREDENTIALS_MALFORMED"))),
            (
                CREATE_ORDER,
                vec![("authorization", "Bearer not-a-jwt")],
                Err((Code::Unauthenticated, "TOKEN_MALFORMED")),
            ),
            (CREATE_ORDER, vec![("authorization", &reader)], Err((Code::PermissionDenied, "MISSING_ROLE"))),
            (CREATE_ORDER, vec![("authorization", &writer)], Ok("alice")),
            (CREATE_ORDER, vec![("authorization", &admin)], Ok("root")),
            (CREATE_ORDER, vec![("x-api-key", "good")], Ok("apikey:ci")),
            (CREATE_ORDER, vec![("authorization", "ApiKey good")], Ok("apikey:ci")),
            (CREATE_ORDER, vec![("x-api-key", "stolen")], Err((Code::Unauthenticated, "API_KEY_INVALID"))),
            (CREATE_ORDER, vec![("x-api-key", "down")], Err((Code::Unavailable, "API_KEYS_UNAVAILABLE"))),
            (
                "/eventfold.query.v1.OrderQueryService/GetOrder",
                vec![("x-api-key", "good")],
                Err((Code::PermissionDenied, "MISSING_ROLE")),
            ),
        ];
        for (path, pairs, want) in cases {
            let got = auth.check(path, &headers(&pairs)).await;
            match (got, want) {
                (Ok(Some(principal)), Ok(subject)) => assert_eq!(principal.subject, subject, "{path} {pairs:?}"),
                (Err(status), Err((code, why))) => {
                    assert_eq!((status.code(), reason(&status).as_str()), (code, why), "{path} {pairs:?}");
                    assert!(!status.message().contains(SECRET), "{status:?}");
                }
                (got, want) => panic!("{path} {pairs:?}: got {got:?}, want {want:?}"),
            }
        }
        // Health checks and reflection need nothing.
        for open in ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"] {
            assert_eq!(auth.check(open, &HeaderMap::new()).await.unwrap(), None, "{open}");
        }
        // Switched off, nothing is asked.
        assert_eq!(Authenticator::disabled().check(CREATE_ORDER, &HeaderMap::new()).await.unwrap(), None);
    }

    /// What the service behind the layer saw as the principal header.
    async fn seen_principal(auth: Authenticator, pairs: &[(&str, &str)]) -> (http::StatusCode, Option<String>) {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let record = seen.clone();
        let inner = service_fn(move |request: http::Request<Body>| {
            let record = record.clone();
            async move {
                *record.lock().unwrap() =
                    request.headers().get(PRINCIPAL_HEADER).map(|v| v.to_str().unwrap().to_owned());
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            }
        });
        let mut request = http::Request::builder().uri(format!("http://x{CREATE_ORDER}"));
        for (name, value) in pairs {
            request = request.header(*name, *value);
        }
        let response =
            AuthLayer::new(Arc::new(auth)).layer(inner).oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let principal = seen.lock().unwrap().clone();
        (response.status(), principal)
    }

    #[tokio::test]
    async fn the_principal_header_is_the_layers_alone() {
        let alice = format!("Bearer {}", token("alice", &["orders.write"]));
        let (_, seen) =
            seen_principal(authenticator(), &[("authorization", &alice), (PRINCIPAL_HEADER, "mallory")]).await;
        assert_eq!(seen.as_deref(), Some("alice"), "the token's subject replaces the client's claim");
        let (_, seen) = seen_principal(Authenticator::disabled(), &[(PRINCIPAL_HEADER, "mallory")]).await;
        assert_eq!(seen, None, "with authentication off, a client still cannot name a principal");
        // A refused call never reaches the service.
        let (status, seen) = seen_principal(authenticator(), &[(PRINCIPAL_HEADER, "mallory")]).await;
        assert_eq!((status, seen), (http::StatusCode::OK, None), "answered by the layer (gRPC status in headers)");
    }
}
