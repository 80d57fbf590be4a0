//! What travels through the command bus: a command of any aggregate with
//! its metadata, and the answer.

use eventfold_domain::{
    Aggregate, Money, Violation, account::AccountCommand, check_id, inventory::InventoryCommand, order::OrderCommand,
    payment::PaymentCommand, shipment::ShipmentCommand, user::UserCommand,
};
use eventfold_store::RequestKey;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A command addressed to one aggregate instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Order {
        order_id: String,
        command: OrderCommand,
    },
    Inventory {
        product_id: String,
        command: InventoryCommand,
    },
    /// Authorize a payment; the handler reads the order's total, the
    /// upper bound of the amount.
    AuthorizePayment {
        payment_id: String,
        order_id: String,
        amount: Money,
        provider_reference: String,
    },
    Payment {
        payment_id: String,
        command: PaymentCommand,
    },
    Shipment {
        shipment_id: String,
        command: ShipmentCommand,
    },
    Account {
        account_id: String,
        command: AccountCommand,
    },
    User {
        user_id: String,
        command: UserCommand,
    },
}

impl Command {
    /// The command's name, as the RPC calls it (for logs and metrics).
    pub fn name(&self) -> &'static str {
        use eventfold_domain::{
            account::AccountCommand as A, inventory::InventoryCommand as I, order::OrderCommand as O,
        };
        use eventfold_domain::{payment::PaymentCommand as P, shipment::ShipmentCommand as S, user::UserCommand as U};
        match self {
            Command::Order { command, .. } => match command {
                O::Create(_) => "CreateOrder",
                O::Confirm(_) => "ConfirmOrder",
                O::ProcessPayment(_) => "ProcessPayment",
                O::Ship(_) => "ShipOrder",
                O::Cancel(_) => "CancelOrder",
            },
            Command::Inventory { command, .. } => match command {
                I::Register(_) => "RegisterProduct",
                I::Replenish(_) => "ReplenishStock",
                I::Reserve(_) => "ReserveStock",
                I::Release(_) => "ReleaseReservation",
                I::Consume(_) => "ConsumeReservation",
            },
            Command::AuthorizePayment { .. } => "AuthorizePayment",
            Command::Payment { command, .. } => match command {
                P::Authorize(_) => "AuthorizePayment",
                P::Decline(_) => "DeclinePayment",
                P::Capture(_) => "CapturePayment",
                P::Refund(_) => "RefundPayment",
                P::Void(_) => "VoidPayment",
            },
            Command::Shipment { command, .. } => match command {
                S::Create(_) => "CreateShipment",
                S::Dispatch(_) => "DispatchShipment",
                S::Deliver(_) => "DeliverShipment",
                S::Cancel(_) => "CancelShipment",
            },
            Command::Account { command, .. } => match command {
                A::Open(_) => "OpenAccount",
                A::Deposit(_) => "DepositMoney",
                A::Withdraw(_) => "WithdrawMoney",
                A::Request(_) => "RequestTransfer",
                A::Send(_) => "SendTransfer",
                A::Receive(_) => "ReceiveTransfer",
                A::Refund(_) => "RefundTransfer",
                A::Close(_) => "CloseAccount",
            },
            Command::User { command, .. } => match command {
                U::Register(_) => "RegisterUser",
                U::Login(_) => "RecordLogin",
                U::Action(_) => "RecordUserAction",
            },
        }
    }

    /// The service the command belongs to (the scope of its request ids).
    pub fn service(&self) -> &'static str {
        match self {
            Command::Order { .. } => "orders",
            Command::Inventory { .. } => "inventory",
            Command::AuthorizePayment { .. } | Command::Payment { .. } => "payments",
            Command::Shipment { .. } => "shipping",
            Command::Account { .. } => "accounts",
            Command::User { .. } => "users",
        }
    }

    /// Checks of the command alone, before anything is loaded.
    pub fn validate(&self) -> Vec<Violation> {
        use eventfold_domain::{account::Account, inventory::Inventory, order::Order, payment::Payment};
        use eventfold_domain::{shipment::Shipment, user::User};
        let mut violations = Vec::new();
        match self {
            Command::Order { order_id, command } => {
                check_id("order_id", order_id, &mut violations);
                violations.extend(Order::validate(command));
            }
            Command::Inventory { product_id, command } => {
                check_id("product_id", product_id, &mut violations);
                violations.extend(Inventory::validate(command));
            }
            Command::AuthorizePayment { payment_id, order_id, amount, provider_reference } => {
                check_id("payment_id", payment_id, &mut violations);
                check_id("order_id", order_id, &mut violations);
                if amount.minor <= 0 {
                    violations.push(Violation::new("amount.minor", "must be positive"));
                }
                if provider_reference.trim().is_empty() || provider_reference.len() > 200 {
                    violations.push(Violation::new("provider_reference", "must be 1 to 200 bytes and not blank"));
                }
            }
            Command::Payment { payment_id, command } => {
                check_id("payment_id", payment_id, &mut violations);
                violations.extend(Payment::validate(command));
            }
            Command::Shipment { shipment_id, command } => {
                check_id("shipment_id", shipment_id, &mut violations);
                violations.extend(Shipment::validate(command));
            }
            Command::Account { account_id, command } => {
                check_id("account_id", account_id, &mut violations);
                violations.extend(Account::validate(command));
            }
            Command::User { user_id, command } => {
                check_id("user_id", user_id, &mut violations);
                violations.extend(User::validate(command));
            }
        }
        violations
    }
}

/// Who sent a command and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// AIP-155: a retry with the same id gets the first answer.
    pub request_id: Option<String>,
    /// The authenticated caller, as the transport established it.
    pub principal: Option<String>,
    /// Ties together everything one business flow caused.
    pub correlation_id: String,
    /// The message (command or event) that caused this command.
    pub causation_id: Option<String>,
}

impl Default for Meta {
    /// No request id or principal, a fresh correlation id.
    fn default() -> Self {
        Self { request_id: None, principal: None, correlation_id: uuid::Uuid::now_v7().to_string(), causation_id: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub command: Command,
    pub meta: Meta,
}

impl Envelope {
    pub fn new(command: Command, meta: Meta) -> Self {
        Self { command, meta }
    }

    /// The AIP-155 key of the command's write, if it has a request id:
    /// the request id scoped to the command's service and principal and
    /// bound to the command's fingerprint, so that the id reused for
    /// another command is refused instead of answered with the first
    /// command's result.
    pub fn request_key(&self) -> Option<RequestKey> {
        let request_id = self.meta.request_id.clone()?;
        // The principal is hashed: any header value gives a bounded scope,
        // and the scope shows no caller's name.
        let principal = Sha256::digest(self.meta.principal.as_deref().unwrap_or("").as_bytes());
        let scope = format!("command/{}/{}", self.command.service(), hex::encode(&principal[..16]));
        // `Debug` of a command is its full content (no maps, no floats):
        // equal for a retry, different for any other command. Unmasked:
        // a command that differs only in a sensitive value (a payment
        // token) is another command, and the text is hashed at once.
        let text = eventfold_domain::sensitive::unmasked_debug(&self.command);
        let fingerprint: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        Some(RequestKey { scope, request_id, fingerprint })
    }
}

/// One stream a command wrote to (or would have, for a no-op). Its
/// `Debug` names the events' types, not their bodies (which hold the
/// sensitive values as they are stored).
#[derive(Clone, PartialEq)]
pub struct Write {
    pub stream_id: String,
    /// The stream's version after the command; `None`: the stream is empty.
    pub stream_version: Option<u64>,
    /// The position of the last appended event; 0 when nothing was appended.
    pub global_position: u64,
    /// The appended events, `(type, body)` in the current schema version:
    /// for a repeated request, those of the first answer.
    pub events: Vec<(String, Value)>,
    /// True when this is the first answer of the same request id.
    pub duplicate: bool,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("stream_id", &self.stream_id)
            .field("stream_version", &self.stream_version)
            .field("global_position", &self.global_position)
            .field("events", &self.events.iter().map(|(event_type, _)| event_type).collect::<Vec<_>>())
            .field("duplicate", &self.duplicate)
            .finish()
    }
}

/// The answer to a command: one write per stream it touched (every
/// command touches one).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub writes: Vec<Write>,
}

impl Reply {
    pub fn single(write: Write) -> Self {
        Self { writes: vec![write] }
    }

    /// The first write (every command has one).
    pub fn first(&self) -> &Write {
        &self.writes[0]
    }

    /// Whether nothing was appended (an idempotent repeat).
    pub fn changed_nothing(&self) -> bool {
        self.writes.iter().any(|w| w.events.is_empty())
    }

    /// The body of the first appended event of `event_type`, if any.
    pub fn event(&self, event_type: &str) -> Option<&Value> {
        self.writes.iter().flat_map(|w| &w.events).find(|(t, _)| t == event_type).map(|(_, data)| data)
    }
}

/// A stream id of `A` for the instance `id`.
pub(crate) fn stream<A: Aggregate>(id: &str) -> String {
    eventfold_domain::stream_id::<A>(id)
}

#[cfg(test)]
mod tests {
    use eventfold_domain::order::{CreateOrder, OrderItem};

    use super::*;

    fn create(token: &str) -> Envelope {
        let create = CreateOrder {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            currency: "EUR".parse().unwrap(),
            items: vec![OrderItem {
                product_id: "p-1".into(),
                quantity: 1,
                unit_price: Money::new(100, "EUR".parse().unwrap()),
            }],
            payment_token: Some(token.into()),
            carrier: None,
        };
        let meta = Meta { request_id: Some("r-1".into()), ..Meta::default() };
        Envelope::new(Command::Order { order_id: "o-1".into(), command: create.into() }, meta)
    }

    #[test]
    fn the_envelope_masks_the_payment_token_and_the_fingerprint_does_not() {
        let (visa, other) = (create("tok_visa_1234"), create("tok_other_5678"));
        assert!(!format!("{visa:?}").contains("tok_visa_1234"), "{visa:?}");
        let key = |e: &Envelope| e.request_key().unwrap().fingerprint;
        assert_eq!(key(&visa), key(&create("tok_visa_1234")), "a retry has the same fingerprint");
        assert_ne!(key(&visa), key(&other), "another token is another command under the same request id");
        // The text hashed is the `{:?}` from before the masking, so the
        // request keys stored by an earlier version still match.
        let text = eventfold_domain::sensitive::unmasked_debug(&visa.command);
        assert!(text.contains(r#"payment_token: Some("tok_visa_1234")"#), "{text}");
    }

    #[test]
    fn a_write_shows_event_types_not_bodies() {
        let write = Write {
            stream_id: "order-o-1".into(),
            stream_version: Some(0),
            global_position: 7,
            events: vec![("OrderCreated".into(), serde_json::json!({"payment_token": "tok_visa_1234"}))],
            duplicate: false,
        };
        let text = format!("{:?}", Reply::single(write));
        assert!(text.contains("OrderCreated") && !text.contains("tok_visa_1234"), "{text}");
    }
}
