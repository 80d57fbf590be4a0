//! The order-processing domain of eventfold: orders, inventory, payments,
//! shipments, accounts and users as aggregates with pure
//! `decide(state, command) -> events | rejection` and
//! `evolve(state, event) -> state` functions.
//!
//! OVERVIEW: no I/O, no proto types, no clock. The command side loads an
//! aggregate's events (upcast to their current version by [`upcast`]),
//! folds them with [`Aggregate::evolve`], asks [`Aggregate::decide`], and
//! appends what it answers; events travel as JSON through
//! [`DomainEvent`]. Reason codes of rejections are UPPER_SNAKE_CASE
//! ([`Reason`]) and become `FAILED_PRECONDITION` at the gRPC edge; field
//! violations become `INVALID_ARGUMENT`.

pub mod account;
mod event;
pub mod inventory;
mod money;
pub mod order;
pub mod payment;
mod rejection;
pub mod saga;
pub mod sensitive;
pub mod shipment;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod upcast;
pub mod user;

use serde::{Serialize, de::DeserializeOwned};

pub use self::{
    event::{DecodeError, DomainEvent},
    money::{Currency, Money, MoneyError},
    rejection::{Reason, Rejection, Violation},
    sensitive::Sensitive,
};

/// An aggregate: a consistency boundary whose state is the fold of its
/// events. `Default` is the state before the first event.
pub trait Aggregate: Default + Clone + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stream category, e.g. `order`: the aggregate with id `42` lives in
    /// the stream `order-42`.
    const CATEGORY: &'static str;
    /// Version of the state's JSON form in snapshots: raise it when the
    /// state changes shape, and older snapshots are ignored and rewritten.
    const SNAPSHOT_VERSION: u32 = 1;
    type Command;
    type Event: DomainEvent + Clone + std::fmt::Debug + PartialEq;

    /// Checks of the command alone, without state: the validation layer
    /// of the command bus runs them before loading anything, and `decide`
    /// runs them again.
    fn validate(command: &Self::Command) -> Vec<Violation>;

    /// Whether `command` only makes sense for a new aggregate (it is refused
    /// by any existing one). The command side then decides it on the empty
    /// state without loading anything and appends expecting no stream; if
    /// the stream exists after all, it loads and decides again, which gives
    /// the proper rejection.
    fn creates(_command: &Self::Command) -> bool {
        false
    }

    /// What happens when `command` meets this state: the events to append,
    /// or why not.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Rejection>;

    /// The state after `event`. Total: an event that was stored is a fact.
    fn evolve(self, event: &Self::Event) -> Self;

    /// The state after `events`, from this one.
    fn fold<'a>(self, events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(self, Self::evolve)
    }
}

/// The stream id of an aggregate instance.
pub fn stream_id<A: Aggregate>(id: &str) -> String {
    format!("{}-{id}", A::CATEGORY)
}

/// Checks shared by the commands: an identifier is 1 to 128 bytes of
/// visible ASCII (no spaces, no control characters, nothing that displays
/// as something else), the same rule as the event store's ids.
pub fn check_id(field: &str, value: &str, violations: &mut Vec<Violation>) {
    if value.is_empty() || value.len() > 128 {
        violations.push(Violation::new(field, "must be 1 to 128 bytes"));
    } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
        violations.push(Violation::new(field, "must be visible ASCII (no spaces or control characters)"));
    }
}

/// A required free-text field: 1 to `max` bytes, no control characters.
pub(crate) fn check_text(field: &str, value: &str, max: usize, violations: &mut Vec<Violation>) {
    if value.trim().is_empty() || value.len() > max {
        violations.push(Violation::new(field, format!("must be 1 to {max} bytes and not blank")));
    } else if value.chars().any(char::is_control) {
        violations.push(Violation::new(field, "must not contain control characters"));
    }
}

/// `Err(Rejection::Invalid)` when there are violations.
pub(crate) fn invalid_if_any(violations: Vec<Violation>) -> Result<(), Rejection> {
    if violations.is_empty() { Ok(()) } else { Err(Rejection::Invalid(violations)) }
}
