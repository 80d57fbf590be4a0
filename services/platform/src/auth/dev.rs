//! The admin API key of `eventfold dev --auth`: made at start, printed
//! once, held in memory only (it works on the in-memory store too), and
//! chained in front of the process's other key store.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{ADMIN_ROLE, KeyError, KeyVerifier, Principal};

/// The subject of the dev admin key.
pub const DEV_ADMIN_SUBJECT: &str = "dev-admin";

/// One admin key, then `next` (if any) for every other key.
pub struct DevAdminKey {
    /// SHA-256 of the key: the key itself is not kept.
    hash: [u8; 32],
    next: Option<Arc<dyn KeyVerifier>>,
}

impl DevAdminKey {
    /// A new random key (returned once, to be printed) and its verifier.
    pub fn generate(next: Option<Arc<dyn KeyVerifier>>) -> Result<(String, DevAdminKey), KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|_| KeyError)?;
        let key = format!("efk_dev_{}", hex::encode(secret));
        let hash = Sha256::digest(key.as_bytes()).into();
        Ok((key, DevAdminKey { hash, next }))
    }
}

impl KeyVerifier for DevAdminKey {
    fn verify<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Principal>, KeyError>> {
        Box::pin(async move {
            let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            // Compared as hashes: the time taken says nothing about the key.
            if hash == self.hash {
                return Ok(Some(Principal {
                    subject: DEV_ADMIN_SUBJECT.to_owned(),
                    roles: vec![ADMIN_ROLE.to_owned()],
                }));
            }
            match &self.next {
                Some(next) => next.verify(key).await,
                None => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_generated_key_is_an_admin_and_others_go_to_the_next_store() {
        let (key, dev) = DevAdminKey::generate(None).unwrap();
        assert!(key.starts_with("efk_dev_") && key.len() == "efk_dev_".len() + 64);
        assert_eq!(dev.verify(&key).await.unwrap().unwrap().roles, [ADMIN_ROLE]);
        assert_eq!(dev.verify("efk_dev_other").await.unwrap(), None);
        let (other, second) = DevAdminKey::generate(Some(Arc::new(dev))).unwrap();
        assert_ne!(other, key);
        assert_eq!(second.verify(&key).await.unwrap().unwrap().subject, DEV_ADMIN_SUBJECT, "from the next store");
    }
}
