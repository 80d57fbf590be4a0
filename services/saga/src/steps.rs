//! What each step does: commands to the command side and calls to the
//! payment provider and the carrier, every one with the step's idempotency
//! key, and the translation of their answers into an [`Outcome`].
//!
//! Compensations accept "nothing to undo" as done (a release of a
//! reservation that was never made, a void of an authorization that never
//! happened): they also run for steps whose answer was lost.

use std::sync::Arc;

use eventfold_command::{Command, Envelope, Meta};
use eventfold_domain::{
    Money, Sensitive,
    account::{ReceiveTransfer, RefundTransfer, SendTransfer},
    inventory::{ReleaseReservation, ReserveStock},
    order::{CancelOrder, ConfirmOrder},
    payment::{DeclinePayment, VoidPayment},
    shipment::{CancelShipment, CreateShipment},
};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use crate::{
    error::Error,
    model::{Outcome, Step},
    ports::{Carrier, PaymentProvider},
};

/// The command side, as the sagas use it.
#[async_trait::async_trait]
pub trait CommandSender: Send + Sync + 'static {
    /// Sends `command` with `request_id` (AIP-155: the same id again gets
    /// the first answer and appends nothing). A business rule (or
    /// validation) that refuses it is [`Error::Refused`] with the reason
    /// code; anything worth a retry (a conflict that outlived the bus's own
    /// retries, the store away) is [`Error::Unavailable`].
    async fn send(&self, command: Command, request_id: String, correlation_id: &str) -> Result<(), Error>;
}

#[async_trait::async_trait]
impl CommandSender for eventfold_command::Bus {
    async fn send(&self, command: Command, request_id: String, correlation_id: &str) -> Result<(), Error> {
        let meta = Meta {
            request_id: Some(request_id),
            principal: Some("saga-orchestrator".to_owned()),
            correlation_id: correlation_id.to_owned(),
            causation_id: None,
        };
        match self.clone().oneshot(Envelope::new(command, meta)).await {
            Ok(_) => Ok(()),
            Err(eventfold_command::Error::Rejected { reason, .. }) => {
                Err(Error::Refused { reason: reason.as_str().into() })
            }
            Err(eventfold_command::Error::Invalid(violations)) => Err(Error::Refused {
                reason: format!(
                    "INVALID_COMMAND: {}",
                    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
                ),
            }),
            Err(eventfold_command::Error::PermissionDenied(why)) => {
                Err(Error::Refused { reason: format!("PERMISSION_DENIED: {why}") })
            }
            Err(other) => Err(Error::Unavailable(other.to_string())),
        }
    }
}

/// One product line of an order to fulfil.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_id: String,
    pub quantity: u32,
}

/// The order fulfilment saga's data (`saga_instances.data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfilmentData {
    pub order_id: String,
    pub customer_id: String,
    pub lines: Vec<Line>,
    pub total: Money,
    /// Never logged: `{:?}` of the data prints `<redacted>`.
    pub payment_token: Sensitive<String>,
    pub carrier: String,
    /// The provider's authorization, once authorized.
    #[serde(default)]
    pub authorization_id: Option<String>,
    /// The carrier's tracking number, once labelled.
    #[serde(default)]
    pub tracking_number: Option<String>,
    /// The W3C trace context of the event that started the saga: its
    /// steps join that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl FulfilmentData {
    pub fn payment_id(&self) -> String {
        format!("pay-{}", self.order_id)
    }

    pub fn shipment_id(&self) -> String {
        format!("shp-{}", self.order_id)
    }
}

/// Runs the steps of the order fulfilment saga.
pub struct Fulfilment {
    pub commands: Arc<dyn CommandSender>,
    pub payments: Arc<dyn PaymentProvider>,
    pub carrier: Arc<dyn Carrier>,
}

impl std::fmt::Debug for Fulfilment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fulfilment").finish_non_exhaustive()
    }
}

/// How a step ends that failed with `error`: a refusal is for good, and
/// anything else worth a retry.
fn failed(error: Error) -> Outcome {
    match error {
        Error::Refused { reason } => Outcome::Rejected { reason },
        Error::Unavailable(error) => Outcome::Transient { error },
        other => Outcome::Transient { error: other.to_string() },
    }
}

/// The outcome of a command: done, or how it failed; `already` lists the
/// reason codes that mean the effect is already there.
fn command_outcome(result: Result<(), Error>, already: &[&str]) -> Option<Outcome> {
    match result {
        Ok(()) => None,
        Err(Error::Refused { reason }) if already.contains(&reason.as_str()) => None,
        Err(error) => Some(failed(error)),
    }
}

macro_rules! attempt {
    ($outcome:expr) => {
        if let Some(failed) = $outcome {
            return failed;
        }
    };
}

impl Fulfilment {
    /// Runs `step` of saga `saga_id` (its reason: why it compensates) and
    /// how it ended; `data` takes what the step learned.
    pub async fn run(&self, saga_id: &str, step: Step, reason: Option<&str>, data: &mut FulfilmentData) -> Outcome {
        let key = step.request_id(saga_id);
        let order = data.order_id.clone();
        let send = |command: Command, request_id: String| {
            let commands = self.commands.clone();
            let order = order.clone();
            async move { commands.send(command, request_id, &order).await }
        };
        let reason = reason.unwrap_or("SAGA_FAILED").to_owned();
        match step {
            Step::ReserveInventory => {
                for line in &data.lines {
                    let command = Command::Inventory {
                        product_id: line.product_id.clone(),
                        command: ReserveStock { order_id: order.clone(), quantity: line.quantity }.into(),
                    };
                    attempt!(command_outcome(
                        send(command, format!("{key}:{}", line.product_id)).await,
                        &["RESERVATION_EXISTS"]
                    ));
                }
            }
            Step::AuthorizePayment => {
                match self.payments.authorize(&key, data.payment_token.expose(), data.total).await {
                    Ok(authorization) => {
                        let command = Command::AuthorizePayment {
                            payment_id: data.payment_id(),
                            order_id: order.clone(),
                            amount: authorization.amount,
                            provider_reference: authorization.id.clone(),
                        };
                        data.authorization_id = Some(authorization.id);
                        attempt!(command_outcome(send(command, key).await, &["PAYMENT_ALREADY_EXISTS"]));
                    }
                    Err(Error::Refused { reason }) => {
                        // The decline on record (the payment's stream), then
                        // the saga compensates.
                        let command = Command::Payment {
                            payment_id: data.payment_id(),
                            command: DeclinePayment {
                                payment_id: data.payment_id(),
                                order_id: order.clone(),
                                amount: data.total,
                                reason: reason.clone(),
                            }
                            .into(),
                        };
                        attempt!(command_outcome(
                            send(command, format!("{key}:decline")).await,
                            &["PAYMENT_ALREADY_EXISTS"]
                        ));
                        return Outcome::Rejected { reason };
                    }
                    Err(error) => return failed(error),
                }
            }
            Step::CreateShippingLabel => match self.carrier.create_label(&key, &order, &data.carrier).await {
                Ok(label) => {
                    let command = Command::Shipment {
                        shipment_id: data.shipment_id(),
                        command: CreateShipment {
                            shipment_id: data.shipment_id(),
                            order_id: order.clone(),
                            carrier: label.carrier,
                            tracking_number: label.tracking_number.clone(),
                        }
                        .into(),
                    };
                    data.tracking_number = Some(label.tracking_number);
                    attempt!(command_outcome(send(command, key).await, &["SHIPMENT_ALREADY_EXISTS"]));
                }
                Err(error) => return failed(error),
            },
            Step::ConfirmOrder => {
                let command = Command::Order { order_id: order.clone(), command: ConfirmOrder.into() };
                attempt!(command_outcome(send(command, key).await, &["ORDER_ALREADY_CONFIRMED"]));
            }
            Step::CancelShippingLabel => {
                if let Err(error) = self.carrier.cancel_label(&Step::CreateShippingLabel.request_id(saga_id)).await {
                    return failed(error);
                }
                let command = Command::Shipment {
                    shipment_id: data.shipment_id(),
                    command: CancelShipment { reason: reason.clone() }.into(),
                };
                attempt!(command_outcome(send(command, key).await, &["SHIPMENT_NOT_FOUND", "SHIPMENT_CANCELLED"]));
            }
            Step::VoidAuthorization => {
                if let Err(error) = self.payments.void(&Step::AuthorizePayment.request_id(saga_id)).await {
                    return failed(error);
                }
                let command = Command::Payment {
                    payment_id: data.payment_id(),
                    command: VoidPayment { reason: reason.clone() }.into(),
                };
                attempt!(command_outcome(send(command, key).await, &["PAYMENT_NOT_FOUND", "PAYMENT_VOIDED"]));
            }
            Step::ReleaseInventory => {
                for line in &data.lines {
                    let command = Command::Inventory {
                        product_id: line.product_id.clone(),
                        command: ReleaseReservation { order_id: order.clone(), reason: reason.clone() }.into(),
                    };
                    attempt!(command_outcome(
                        send(command, format!("{key}:{}", line.product_id)).await,
                        &["RESERVATION_NOT_FOUND", "RESERVATION_CLOSED", "PRODUCT_NOT_FOUND"]
                    ));
                }
            }
            Step::CancelOrder => {
                let command =
                    Command::Order { order_id: order.clone(), command: CancelOrder { reason: reason.clone() }.into() };
                attempt!(command_outcome(send(command, key).await, &["ORDER_CANCELLED"]));
            }
            Step::Withdraw | Step::Deposit | Step::RefundSource => {
                return Outcome::Rejected { reason: format!("{} is not a fulfilment step", step.as_str()) };
            }
        }
        Outcome::Done
    }
}

/// The money transfer saga's data (`saga_instances.data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferData {
    pub transfer_id: String,
    pub from_account_id: String,
    pub to_account_id: String,
    pub amount: Money,
    /// The W3C trace context of the event that started the saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Runs the steps of the money transfer saga: the source's side (sent,
/// refunded) and the target's (received), each once per transfer id.
#[derive(Clone)]
pub struct Transfer {
    pub commands: Arc<dyn CommandSender>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfer").finish_non_exhaustive()
    }
}

impl Transfer {
    /// Runs `step` of saga `saga_id` (its reason: why it compensates).
    pub async fn run(&self, saga_id: &str, step: Step, reason: Option<&str>, data: &TransferData) -> Outcome {
        let key = step.request_id(saga_id);
        let (account_id, command, already): (&str, eventfold_domain::account::AccountCommand, &[&str]) = match step {
            Step::Withdraw => (
                &data.from_account_id,
                SendTransfer {
                    transfer_id: data.transfer_id.clone(),
                    to_account_id: data.to_account_id.clone(),
                    amount: data.amount,
                }
                .into(),
                &[],
            ),
            Step::Deposit => (
                &data.to_account_id,
                ReceiveTransfer {
                    transfer_id: data.transfer_id.clone(),
                    from_account_id: data.from_account_id.clone(),
                    amount: data.amount,
                }
                .into(),
                &[],
            ),
            // Nothing was sent: nothing to refund.
            Step::RefundSource => (
                &data.from_account_id,
                RefundTransfer {
                    transfer_id: data.transfer_id.clone(),
                    reason: reason.unwrap_or("TRANSFER_FAILED").to_owned(),
                }
                .into(),
                &["TRANSFER_NOT_FOUND"],
            ),
            other => return Outcome::Rejected { reason: format!("{} is not a transfer step", other.as_str()) },
        };
        let command = Command::Account { account_id: account_id.to_owned(), command };
        match command_outcome(self.commands.send(command, key, &data.transfer_id).await, already) {
            Some(failed) => failed,
            None => Outcome::Done,
        }
    }
}
