//! The world outside eventfold that the order fulfilment saga talks to: a
//! payment provider and a carrier, behind traits, and sandbox adapters
//! whose failures are chosen by the input, like a payment provider's test
//! cards:
//!
//! | input | sandbox answer |
//! |---|---|
//! | payment token `tok_decline` | declined (`PAYMENT_DECLINED`) |
//! | payment token `tok_timeout` | never answers |
//! | payment token `tok_flaky` | unavailable twice per idempotency key, then authorized |
//! | any other non-empty token (e.g. `tok_visa`) | authorized |
//! | carrier `fail_label` | label rejected (`LABEL_REJECTED`) |
//! | carrier `flaky_label` | unavailable twice per idempotency key, then a label |
//! | any other carrier (e.g. `DHL`) | a label |
//!
//! Both keep what they did by idempotency key: the same key again answers
//! the first answer, so a retried or replayed step authorizes (or labels)
//! once.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use eventfold_domain::Money;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// An authorization the provider holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub id: String,
    pub amount: Money,
}

/// A payment provider. Its calls fail with [`Error::Refused`] (for good,
/// with an UPPER_SNAKE_CASE reason) or [`Error::Unavailable`] (worth a
/// retry).
#[async_trait::async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Authorizes `amount` on `token`. The same `key` again answers the
    /// first answer: one authorization per key.
    async fn authorize(&self, key: &str, token: &str, amount: Money) -> Result<Authorization, Error>;

    /// Voids the authorization made with `key`. Voiding what was never
    /// authorized, or is void already, is Ok: a compensation may run for
    /// a step whose answer was lost.
    async fn void(&self, key: &str) -> Result<(), Error>;
}

/// A shipping label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub carrier: String,
    pub tracking_number: String,
}

/// A carrier. Its calls fail as a [`PaymentProvider`]'s do.
#[async_trait::async_trait]
pub trait Carrier: Send + Sync + 'static {
    /// A label for `order_id` with `carrier`. The same `key` again
    /// answers the first label.
    async fn create_label(&self, key: &str, order_id: &str, carrier: &str) -> Result<Label, Error>;

    /// Cancels the label made with `key`; Ok if there is none.
    async fn cancel_label(&self, key: &str) -> Result<(), Error>;
}

/// Settings of the sandbox adapters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// How long each call takes.
    pub latency_ms: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self { latency_ms: 5 }
    }
}

/// A short, stable id for what was made with `key`.
fn id_for(prefix: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// Counts the calls per key of a `flaky` input; whether this one fails.
fn flaky_fails(calls: &Mutex<BTreeMap<String, u32>>, key: &str) -> bool {
    let mut calls = calls.lock().unwrap_or_else(PoisonError::into_inner);
    let n = calls.entry(key.to_owned()).or_default();
    *n = n.saturating_add(1);
    *n <= 2
}

/// An authorization as the sandbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxAuthorization {
    pub key: String,
    pub authorization: Authorization,
    pub voided: bool,
}

/// The sandbox payment provider (see the module documentation).
#[derive(Debug, Default)]
pub struct SandboxPayments {
    config: SandboxConfig,
    authorizations: Mutex<BTreeMap<String, SandboxAuthorization>>,
    flaky: Mutex<BTreeMap<String, u32>>,
}

impl SandboxPayments {
    pub fn new(config: SandboxConfig) -> Self {
        Self { config, ..Self::default() }
    }

    /// Every authorization it made, voided or not, by key.
    pub fn authorizations(&self) -> Vec<SandboxAuthorization> {
        self.authorizations.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl PaymentProvider for SandboxPayments {
    async fn authorize(&self, key: &str, token: &str, amount: Money) -> Result<Authorization, Error> {
        tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        if let Some(known) = self.authorizations.lock().unwrap_or_else(PoisonError::into_inner).get(key) {
            return Ok(known.authorization.clone());
        }
        match token {
            "" => return Err(Error::Refused { reason: "PAYMENT_TOKEN_MISSING".to_owned() }),
            "tok_decline" => return Err(Error::Refused { reason: "PAYMENT_DECLINED".to_owned() }),
            "tok_timeout" => std::future::pending::<()>().await,
            "tok_flaky" if flaky_fails(&self.flaky, key) => {
                return Err(Error::Unavailable("sandbox: tok_flaky fails twice per key".to_owned()));
            }
            _ => {}
        }
        let authorization = Authorization { id: id_for("auth", key), amount };
        let entry = SandboxAuthorization { key: key.to_owned(), authorization: authorization.clone(), voided: false };
        self.authorizations.lock().unwrap_or_else(PoisonError::into_inner).entry(key.to_owned()).or_insert(entry);
        Ok(authorization)
    }

    async fn void(&self, key: &str) -> Result<(), Error> {
        tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        if let Some(entry) = self.authorizations.lock().unwrap_or_else(PoisonError::into_inner).get_mut(key) {
            entry.voided = true;
        }
        Ok(())
    }
}

/// A label as the sandbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLabel {
    pub key: String,
    pub order_id: String,
    pub label: Label,
    pub cancelled: bool,
}

/// The sandbox carrier (see the module documentation).
#[derive(Debug, Default)]
pub struct SandboxCarrier {
    config: SandboxConfig,
    labels: Mutex<BTreeMap<String, SandboxLabel>>,
    flaky: Mutex<BTreeMap<String, u32>>,
}

impl SandboxCarrier {
    pub fn new(config: SandboxConfig) -> Self {
        Self { config, ..Self::default() }
    }

    /// Every label it made, cancelled or not, by key.
    pub fn labels(&self) -> Vec<SandboxLabel> {
        self.labels.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl Carrier for SandboxCarrier {
    async fn create_label(&self, key: &str, order_id: &str, carrier: &str) -> Result<Label, Error> {
        tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        if let Some(known) = self.labels.lock().unwrap_or_else(PoisonError::into_inner).get(key) {
            return Ok(known.label.clone());
        }
        match carrier {
            "fail_label" => return Err(Error::Refused { reason: "LABEL_REJECTED".to_owned() }),
            "flaky_label" if flaky_fails(&self.flaky, key) => {
                return Err(Error::Unavailable("sandbox: flaky_label fails twice per key".to_owned()));
            }
            _ => {}
        }
        let label = Label { carrier: carrier.to_owned(), tracking_number: id_for("trk", key) };
        let entry =
            SandboxLabel { key: key.to_owned(), order_id: order_id.to_owned(), label: label.clone(), cancelled: false };
        self.labels.lock().unwrap_or_else(PoisonError::into_inner).entry(key.to_owned()).or_insert(entry);
        Ok(label)
    }

    async fn cancel_label(&self, key: &str) -> Result<(), Error> {
        tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        if let Some(entry) = self.labels.lock().unwrap_or_else(PoisonError::into_inner).get_mut(key) {
            entry.cancelled = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(minor: i64) -> Money {
        Money::new(minor, "EUR".parse().unwrap())
    }

    fn fast() -> SandboxConfig {
        SandboxConfig { latency_ms: 0 }
    }

    #[tokio::test]
    async fn test_tokens_decide_the_payment_answer() {
        let payments = SandboxPayments::new(fast());
        let ok = payments.authorize("k-1", "tok_visa", eur(500)).await.unwrap();
        assert_eq!(ok.amount, eur(500));
        assert_eq!(payments.authorize("k-1", "tok_visa", eur(500)).await.unwrap(), ok, "same key, same answer");
        assert!(matches!(
            payments.authorize("k-2", "tok_decline", eur(500)).await,
            Err(Error::Refused { reason }) if reason == "PAYMENT_DECLINED"
        ));
        assert!(matches!(payments.authorize("k-3", "", eur(1)).await, Err(Error::Refused { .. })));
        let hung = tokio::time::timeout(Duration::from_millis(50), payments.authorize("k-4", "tok_timeout", eur(1)));
        assert!(hung.await.is_err(), "tok_timeout never answers");
        for _ in 0..2 {
            assert!(matches!(payments.authorize("k-5", "tok_flaky", eur(1)).await, Err(Error::Unavailable(_))));
        }
        assert!(payments.authorize("k-5", "tok_flaky", eur(1)).await.is_ok(), "the third call succeeds");
        let made = payments.authorizations();
        assert_eq!(made.len(), 2, "one authorization per key that succeeded: {made:?}");
        payments.void("k-1").await.unwrap();
        payments.void("never-authorized").await.unwrap();
        assert!(payments.authorizations().iter().any(|a| a.key == "k-1" && a.voided));
    }

    #[tokio::test]
    async fn carriers_decide_the_label_answer() {
        let carrier = SandboxCarrier::new(fast());
        let label = carrier.create_label("k-1", "o-1", "DHL").await.unwrap();
        assert_eq!(label.carrier, "DHL");
        assert_eq!(carrier.create_label("k-1", "o-1", "DHL").await.unwrap(), label);
        assert!(matches!(
            carrier.create_label("k-2", "o-2", "fail_label").await,
            Err(Error::Refused { reason }) if reason == "LABEL_REJECTED"
        ));
        for _ in 0..2 {
            assert!(matches!(carrier.create_label("k-3", "o-3", "flaky_label").await, Err(Error::Unavailable(_))));
        }
        assert!(carrier.create_label("k-3", "o-3", "flaky_label").await.is_ok());
        carrier.cancel_label("k-1").await.unwrap();
        carrier.cancel_label("none").await.unwrap();
        let labels = carrier.labels();
        assert_eq!(labels.len(), 2);
        assert!(labels.iter().any(|l| l.key == "k-1" && l.cancelled));
    }

    #[tokio::test]
    async fn latency_is_configurable() {
        let payments = SandboxPayments::new(SandboxConfig { latency_ms: 40 });
        let started = std::time::Instant::now();
        payments.authorize("k", "tok_visa", eur(1)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(40));
    }
}
