//! Why a command was refused.

use std::fmt;

/// A field that fails validation, named by its path in the command
/// (`items[2].quantity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

macro_rules! reasons {
    ($($variant:ident => $code:literal,)*) => {
        /// A business rule a command broke: the `ErrorInfo.reason` of a
        /// `FAILED_PRECONDITION` answer.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The reason code, UPPER_SNAKE_CASE (AIP-193).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    OrderAlreadyExists => "ORDER_ALREADY_EXISTS",
    OrderNotFound => "ORDER_NOT_FOUND",
    OrderAlreadyConfirmed => "ORDER_ALREADY_CONFIRMED",
    OrderNotConfirmed => "ORDER_NOT_CONFIRMED",
    OrderAlreadyPaid => "ORDER_ALREADY_PAID",
    OrderNotPaid => "ORDER_NOT_PAID",
    OrderAlreadyShipped => "ORDER_ALREADY_SHIPPED",
    OrderCancelled => "ORDER_CANCELLED",
    PaymentAmountMismatch => "PAYMENT_AMOUNT_MISMATCH",
    CurrencyMismatch => "CURRENCY_MISMATCH",
    ProductAlreadyExists => "PRODUCT_ALREADY_EXISTS",
    ProductNotFound => "PRODUCT_NOT_FOUND",
    InsufficientStock => "INSUFFICIENT_STOCK",
    ReservationExists => "RESERVATION_EXISTS",
    ReservationNotFound => "RESERVATION_NOT_FOUND",
    ReservationClosed => "RESERVATION_CLOSED",
    PaymentAlreadyExists => "PAYMENT_ALREADY_EXISTS",
    PaymentNotFound => "PAYMENT_NOT_FOUND",
    PaymentDeclined => "PAYMENT_DECLINED",
    PaymentVoided => "PAYMENT_VOIDED",
    PaymentAlreadyCaptured => "PAYMENT_ALREADY_CAPTURED",
    AmountExceedsOrderTotal => "AMOUNT_EXCEEDS_ORDER_TOTAL",
    AmountExceedsAuthorized => "AMOUNT_EXCEEDS_AUTHORIZED",
    AmountExceedsCaptured => "AMOUNT_EXCEEDS_CAPTURED",
    ShipmentAlreadyExists => "SHIPMENT_ALREADY_EXISTS",
    ShipmentNotFound => "SHIPMENT_NOT_FOUND",
    ShipmentAlreadyDispatched => "SHIPMENT_ALREADY_DISPATCHED",
    ShipmentNotDispatched => "SHIPMENT_NOT_DISPATCHED",
    ShipmentAlreadyDelivered => "SHIPMENT_ALREADY_DELIVERED",
    ShipmentCancelled => "SHIPMENT_CANCELLED",
    AccountAlreadyExists => "ACCOUNT_ALREADY_EXISTS",
    AccountNotFound => "ACCOUNT_NOT_FOUND",
    AccountClosed => "ACCOUNT_CLOSED",
    AccountNotEmpty => "ACCOUNT_NOT_EMPTY",
    InsufficientFunds => "INSUFFICIENT_FUNDS",
    DuplicateTransaction => "DUPLICATE_TRANSACTION",
    SameAccountTransfer => "SAME_ACCOUNT_TRANSFER",
    TransferNotFound => "TRANSFER_NOT_FOUND",
    UserAlreadyRegistered => "USER_ALREADY_REGISTERED",
    UserNotFound => "USER_NOT_FOUND",
    AmountOverflow => "AMOUNT_OVERFLOW",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `decide` refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The command itself is malformed (`INVALID_ARGUMENT`).
    #[error("invalid command: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Violation>),
    /// The command is well formed but the state forbids it
    /// (`FAILED_PRECONDITION`).
    #[error("{reason}: {message}")]
    Rule { reason: Reason, message: String },
}

impl Rejection {
    pub fn rule(reason: Reason, message: impl Into<String>) -> Self {
        Self::Rule { reason, message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Invalid(vec![Violation::new(field, description)])
    }

    /// The reason code of a rule rejection.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Self::Rule { reason, .. } => Some(*reason),
            Self::Invalid(_) => None,
        }
    }
}
