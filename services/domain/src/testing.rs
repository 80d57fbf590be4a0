//! Given/when/then tests of aggregates: given past events, when a command
//! arrives, then these events (or this rejection). Compiled for this
//! crate's tests and, with the feature `testing`, for other crates' tests;
//! never into a server (its checks panic).
//!
//! ```
//! use eventfold_domain::{order::*, testing::Scenario, Reason};
//! Scenario::<Order>::given_no_events().when(ConfirmOrder).then_reject(Reason::OrderNotFound);
//! ```

use crate::{Aggregate, DomainEvent, Reason, Rejection};

pub struct Scenario<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> Scenario<A> {
    pub fn given_no_events() -> Self {
        Self { state: A::default() }
    }

    pub fn given<E: Into<A::Event>>(events: impl IntoIterator<Item = E>) -> Self {
        let events: Vec<A::Event> = events.into_iter().map(Into::into).collect();
        Self { state: A::default().fold(&events) }
    }

    pub fn when(self, command: impl Into<A::Command>) -> Outcome<A> {
        let result = self.state.decide(&command.into());
        Outcome { state: self.state, result }
    }
}

#[must_use = "an outcome asserts nothing until a then_* method is called"]
pub struct Outcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, Rejection>,
}

impl<A: Aggregate> Outcome<A> {
    /// The command produced exactly `expected`; they survive the trip
    /// through JSON and the state can evolve with them. Returns the new
    /// state.
    #[track_caller]
    pub fn then_expect<E: Into<A::Event>>(self, expected: impl IntoIterator<Item = E>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().map(Into::into).collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "events of the command");
                for event in &events {
                    let decoded = A::Event::from_data(event.event_type(), event.schema_version(), event.to_data())
                        .expect("an event decodes from its own JSON");
                    assert_eq!(&decoded, event, "JSON round trip of {}", event.event_type());
                }
                self.state.fold(&events)
            }
            Err(rejection) => panic!("expected events {expected:?}, the command was rejected: {rejection}"),
        }
    }

    #[track_caller]
    pub fn then_reject(self, reason: Reason) {
        match self.result {
            Err(Rejection::Rule { reason: actual, message }) => {
                assert_eq!(actual, reason, "reason of the rejection ({message})");
                assert!(!message.is_empty(), "a rejection explains itself");
            }
            other => panic!("expected a rejection {reason}, got {other:?}"),
        }
    }

    /// Rejected as invalid, naming exactly these fields (in order).
    #[track_caller]
    pub fn then_invalid(self, fields: &[&str]) {
        match self.result {
            Err(Rejection::Invalid(violations)) => {
                let named: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(named, fields, "fields named by the violations: {violations:?}");
            }
            other => panic!("expected an invalid-argument rejection of {fields:?}, got {other:?}"),
        }
    }
}
