//! `eventfold.admin.v1.ApiKeyService`: the [`ApiKeyStore`] over gRPC. This
//! is its edge: requests become store calls here, and every store
//! [`Error`] becomes its status through one `From<Error> for Status`.
//! Besides the store's bounds (see [`super`]), a `page_token` is at most
//! [`MAX_PAGE_TOKEN_BYTES`] bytes, only as this service issued it, and
//! `page_size` is lowered to 500. The key itself is in one answer only,
//! CreateApiKey's.

use std::time::Duration;

use eventfold_proto::admin::{
    self as pb,
    api_key_service_server::{ApiKeyService, ApiKeyServiceServer},
};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use super::{ApiKey, ApiKeyStore, Error, from_cursor, to_cursor};
use crate::{
    page,
    server::GrpcServer,
    status::{self, error_info, invalid_argument},
};

/// The gRPC names of the service, as health and reflection know them.
pub const SERVICE_NAMES: &[&str] = &["eventfold.admin.v1.ApiKeyService"];

/// How often the health of the service follows the key table.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Longest page token accepted (those this service issues are far shorter).
pub const MAX_PAGE_TOKEN_BYTES: usize = 1024;

/// The service. Give it the [`ApiKeyStore`] that the process's
/// authentication layer verifies with, so that a key it revokes is refused
/// by this process at once.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    store: ApiKeyStore,
}

impl ApiKeys {
    pub fn new(store: ApiKeyStore) -> Self {
        Self { store }
    }
}

/// Hosts the `ApiKeyService` over `store` on `server`, with a health check
/// of the key table.
pub fn host(server: &mut GrpcServer, store: ApiKeyStore) {
    let probed = store.clone();
    server.add_service(eventfold_proto::FILE_DESCRIPTOR_SET, ApiKeyServiceServer::new(ApiKeys::new(store)));
    server.health_check(SERVICE_NAMES, HEALTH_INTERVAL, move || {
        let store = probed.clone();
        async move { store.check().await.map_err(|e| e.to_string()) }
    });
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::Invalid(violations) => status::invalid(violations),
            Error::NotFound { id } => {
                error_info(Code::NotFound, format!("no API key has the id {id}"), "API_KEY_NOT_FOUND", &[("id", id)])
            }
            Error::Store(eventfold_store::Error::Unavailable(detail)) => {
                status::unavailable("the API key store", &detail)
            }
            Error::Store(other) => status::from_store(other),
        }
    }
}

fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    time.into()
}

/// The resource as answered: never the key or its hash (the store has
/// neither to give).
fn api_key_pb(key: ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.to_string(),
        name: key.name,
        prefix: key.prefix,
        roles: key.roles,
        create_time: Some(timestamp(key.create_time)),
        last_use_time: key.last_use_time.map(timestamp),
        revoke_time: key.revoke_time.map(timestamp),
    }
}

#[tonic::async_trait]
impl ApiKeyService for ApiKeys {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let r = request.into_inner();
        let created = self.store.create(&r.name, &r.roles).await?;
        tracing::info!(key_id = %created.api_key.id, name = %created.api_key.name, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(api_key_pb(created.api_key)),
            key: created.key.expose().to_owned(),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let r = request.into_inner();
        let size = page::size(r.page_size)?;
        if r.page_token.len() > MAX_PAGE_TOKEN_BYTES {
            return Err(invalid_argument([(
                "page_token".to_owned(),
                format!("must be at most {MAX_PAGE_TOKEN_BYTES} bytes"),
            )]));
        }
        // No filters: every token is for the same list.
        let after = match page::cursor::<(i64, Uuid)>("", &r.page_token)? {
            None => None,
            Some(cursor) => Some(from_cursor(cursor).ok_or_else(|| {
                invalid_argument([("page_token".to_owned(), "is not a token this service issued".to_owned())])
            })?),
        };
        let mut keys = self.store.list(after, size.saturating_add(1)).await?;
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let more = keys.len() > size;
        keys.truncate(size);
        let next_page_token = match keys.last() {
            Some(last) if more => page::token("", &to_cursor((last.create_time, last.id))),
            _ => String::new(),
        };
        let api_keys = keys.into_iter().map(api_key_pb).collect();
        Ok(Response::new(pb::ListApiKeysResponse { api_keys, next_page_token }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let r = request.into_inner();
        let revoked = self.store.revoke(&r.id).await?;
        tracing::info!(key_id = %revoked.id, name = %revoked.name, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse { api_key: Some(api_key_pb(revoked)) }))
    }
}
