//! The sagas' configuration (`[saga]`): the intake runs with the
//! projectors, the orchestrator against the sandbox payment provider and
//! carrier, and the `SagaService` with its limits.

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    grpc::Sagas,
    orchestrator::OrchestratorConfig,
    ports::{SandboxCarrier, SandboxConfig, SandboxPayments},
    steps::{CommandSender, Fulfilment},
};

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SagaConfig {
    pub enabled: bool,
    /// Where `eventfold serve saga` listens (`eventfold dev` serves the
    /// sagas on the event store's address).
    pub listen: SocketAddr,
    pub orchestrator: OrchestratorConfig,
    pub sandbox: SandboxConfig,
    /// WatchSaga streams one client address may hold open at once.
    pub max_watchers_per_peer: u32,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 50054)),
            orchestrator: OrchestratorConfig::default(),
            sandbox: SandboxConfig::default(),
            // As `grpc::DEFAULT_MAX_WATCHERS_PER_PEER`.
            max_watchers_per_peer: 100,
        }
    }
}

impl SagaConfig {
    /// The saga service over `sagas`, with this configuration's limits.
    pub fn service(&self, sagas: Sagas) -> Sagas {
        sagas.with_max_watchers_per_peer(usize::try_from(self.max_watchers_per_peer).unwrap_or(usize::MAX))
    }

    /// The fulfilment saga's steps: commands through `commands`, the
    /// sandbox payment provider and carrier of this configuration.
    pub fn fulfilment(&self, commands: Arc<dyn CommandSender>) -> Fulfilment {
        Fulfilment {
            commands,
            payments: Arc::new(SandboxPayments::new(self.sandbox.clone())),
            carrier: Arc::new(SandboxCarrier::new(self.sandbox.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_match_the_service_and_unknown_fields_are_refused() {
        let config: SagaConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, SagaConfig::default());
        assert_eq!(usize::try_from(config.max_watchers_per_peer).unwrap(), crate::grpc::DEFAULT_MAX_WATCHERS_PER_PEER);
        assert!(serde_json::from_str::<SagaConfig>(r#"{"enabeld": false}"#).is_err());
    }
}
