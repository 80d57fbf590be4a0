//! AIP-158 pagination: page sizes and opaque page tokens. A token holds
//! the keyset cursor after the last item returned and a fingerprint of the
//! request's filters; a token used with other filters is refused.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tonic::Status;

/// Items per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
/// The most items per page; larger requests are lowered to it (AIP-158).
pub const MAX_PAGE_SIZE: i32 = 500;

/// The page size to use for `requested`.
pub fn size(requested: i32) -> Result<i64, Status> {
    match requested {
        n if n < 0 => {
            Err(crate::status::invalid_argument([("page_size".to_owned(), "must not be negative".to_owned())]))
        }
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        n => Ok(i64::from(n.min(MAX_PAGE_SIZE))),
    }
}

fn fingerprint(filters: &str) -> String {
    let digest = Sha256::digest(filters.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The token that continues after `cursor` for requests with `filters`.
pub fn token<C: Serialize>(filters: &str, cursor: &C) -> String {
    let body = serde_json::json!({ "f": fingerprint(filters), "c": cursor });
    URL_SAFE_NO_PAD.encode(body.to_string())
}

/// The cursor of `token` (None for the first page).
pub fn cursor<C: DeserializeOwned>(filters: &str, token: &str) -> Result<Option<C>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = |why: &str| crate::status::invalid_argument([("page_token".to_owned(), why.to_owned())]);
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid("is not a token this service issued"))?;
    let body: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| invalid("is not a token this service issued"))?;
    if body.get("f").and_then(serde_json::Value::as_str) != Some(fingerprint(filters).as_str()) {
        return Err(invalid("was issued for other filters; repeat the request's filters with its token"));
    }
    let cursor = body.get("c").cloned().ok_or_else(|| invalid("is not a token this service issued"))?;
    // A forged cursor must not carry what the database refuses (NUL) or
    // what no issued token holds.
    if has_control(&cursor) {
        return Err(invalid("is not a token this service issued"));
    }
    serde_json::from_value(cursor).map(Some).map_err(|_| invalid("is not a token this service issued"))
}

fn has_control(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.chars().any(char::is_control),
        serde_json::Value::Array(items) => items.iter().any(has_control),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.chars().any(char::is_control) || has_control(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_filters_and_garbage() {
        let t = token("customer=c-1", &(17_i64, "o-9".to_owned()));
        assert_eq!(cursor::<(i64, String)>("customer=c-1", &t).unwrap(), Some((17, "o-9".to_owned())));
        assert_eq!(cursor::<(i64, String)>("customer=c-1", "").unwrap(), None);
        let other = cursor::<(i64, String)>("customer=c-2", &t).unwrap_err();
        assert_eq!(other.code(), tonic::Code::InvalidArgument);
        assert!(other.message().contains("page_token"), "{}", other.message());
        assert_eq!(cursor::<(i64, String)>("customer=c-1", "%%%").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size(0).unwrap(), 50);
        assert_eq!(size(10_000).unwrap(), 500);
        assert_eq!(size(-1).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
