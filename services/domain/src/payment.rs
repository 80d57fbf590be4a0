//! A payment for one order: authorized up to the order total, captured up
//! to what was authorized, refunded up to what was captured; voidable only
//! before any capture. A declined payment stays declined.

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Money, Reason, Rejection, Violation, check_id, check_text,
    event::{command_enum, domain_events},
    invalid_if_any,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PaymentStatus {
    #[default]
    New,
    Authorized,
    Declined,
    Voided,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizePayment {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    /// The order's total, read by the handler: the upper bound.
    pub order_total: Money,
    /// The provider's reference of the authorization.
    pub provider_reference: String,
}

/// The provider refused the authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclinePayment {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturePayment {
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundPayment {
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidPayment {
    pub reason: String,
}

command_enum! {
    pub enum PaymentCommand {
        Authorize(AuthorizePayment),
        Decline(DeclinePayment),
        Capture(CapturePayment),
        Refund(RefundPayment),
        Void(VoidPayment),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    pub provider_reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentVoided {
    pub payment_id: String,
    pub order_id: String,
    pub reason: String,
}

domain_events! {
    pub enum PaymentEvent {
        Authorized(PaymentAuthorized) = 1,
        Declined(PaymentDeclined) = 1,
        Captured(PaymentCaptured) = 1,
        Refunded(PaymentRefunded) = 1,
        Voided(PaymentVoided) = 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Payment {
    pub id: String,
    pub order_id: String,
    pub status: PaymentStatus,
    /// Authorized amount; `None` before authorization.
    pub authorized: Option<Money>,
    pub captured: i64,
    pub refunded: i64,
}

fn check_amount(field: &str, amount: &Money, violations: &mut Vec<Violation>) {
    if amount.minor <= 0 {
        violations.push(Violation::new(format!("{field}.minor"), "must be positive"));
    }
}

impl Payment {
    /// The authorized amount, if the payment is authorized and not voided.
    fn authorized(&self) -> Result<Money, Rejection> {
        match self.status {
            PaymentStatus::New => Err(Rejection::rule(Reason::PaymentNotFound, "the payment does not exist")),
            PaymentStatus::Declined => Err(Rejection::rule(Reason::PaymentDeclined, "the payment was declined")),
            PaymentStatus::Voided => Err(Rejection::rule(Reason::PaymentVoided, "the payment was voided")),
            PaymentStatus::Authorized => Ok(self.authorized.expect("an authorized payment has an amount")),
        }
    }

    fn same_currency(authorized: Money, amount: Money) -> Result<(), Rejection> {
        if authorized.currency == amount.currency {
            Ok(())
        } else {
            Err(Rejection::rule(
                Reason::CurrencyMismatch,
                format!("amount in {}, payment in {}", amount.currency, authorized.currency),
            ))
        }
    }
}

impl Aggregate for Payment {
    const CATEGORY: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;

    fn creates(command: &PaymentCommand) -> bool {
        matches!(command, PaymentCommand::Authorize(_) | PaymentCommand::Decline(_))
    }

    fn validate(command: &PaymentCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            PaymentCommand::Authorize(c) => {
                check_id("payment_id", &c.payment_id, &mut violations);
                check_id("order_id", &c.order_id, &mut violations);
                check_amount("amount", &c.amount, &mut violations);
                check_amount("order_total", &c.order_total, &mut violations);
                check_text("provider_reference", &c.provider_reference, 200, &mut violations);
            }
            PaymentCommand::Decline(c) => {
                check_id("payment_id", &c.payment_id, &mut violations);
                check_id("order_id", &c.order_id, &mut violations);
                check_amount("amount", &c.amount, &mut violations);
                check_text("reason", &c.reason, 500, &mut violations);
            }
            PaymentCommand::Capture(c) => check_amount("amount", &c.amount, &mut violations),
            PaymentCommand::Refund(c) => {
                check_amount("amount", &c.amount, &mut violations);
                check_text("reason", &c.reason, 500, &mut violations);
            }
            PaymentCommand::Void(c) => check_text("reason", &c.reason, 500, &mut violations),
        }
        violations
    }

    fn decide(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        let exists = || Rejection::rule(Reason::PaymentAlreadyExists, format!("payment {} exists", self.id));
        let (payment_id, order_id) = (self.id.clone(), self.order_id.clone());
        let event = match command {
            PaymentCommand::Authorize(c) => {
                if self.status != PaymentStatus::New {
                    return Err(exists());
                }
                Self::same_currency(c.order_total, c.amount)?;
                if c.amount.minor > c.order_total.minor {
                    return Err(Rejection::rule(
                        Reason::AmountExceedsOrderTotal,
                        format!("{} requested for an order total of {}", c.amount.minor, c.order_total.minor),
                    ));
                }
                PaymentAuthorized {
                    payment_id: c.payment_id.clone(),
                    order_id: c.order_id.clone(),
                    amount: c.amount,
                    provider_reference: c.provider_reference.clone(),
                }
                .into()
            }
            PaymentCommand::Decline(c) => {
                if self.status != PaymentStatus::New {
                    return Err(exists());
                }
                PaymentDeclined {
                    payment_id: c.payment_id.clone(),
                    order_id: c.order_id.clone(),
                    amount: c.amount,
                    reason: c.reason.clone(),
                }
                .into()
            }
            PaymentCommand::Capture(c) => {
                let authorized = self.authorized()?;
                Self::same_currency(authorized, c.amount)?;
                if c.amount.minor > authorized.minor - self.captured {
                    return Err(Rejection::rule(
                        Reason::AmountExceedsAuthorized,
                        format!(
                            "{} requested, {} of {} authorized left to capture",
                            c.amount.minor,
                            authorized.minor - self.captured,
                            authorized.minor
                        ),
                    ));
                }
                PaymentCaptured { payment_id, order_id, amount: c.amount }.into()
            }
            PaymentCommand::Refund(c) => {
                let authorized = self.authorized()?;
                Self::same_currency(authorized, c.amount)?;
                if c.amount.minor > self.captured - self.refunded {
                    return Err(Rejection::rule(
                        Reason::AmountExceedsCaptured,
                        format!(
                            "{} requested, {} captured and not refunded",
                            c.amount.minor,
                            self.captured - self.refunded
                        ),
                    ));
                }
                PaymentRefunded { payment_id, order_id, amount: c.amount, reason: c.reason.clone() }.into()
            }
            PaymentCommand::Void(c) => {
                self.authorized()?;
                if self.captured > 0 {
                    return Err(Rejection::rule(
                        Reason::PaymentAlreadyCaptured,
                        "a captured payment cannot be voided; refund it",
                    ));
                }
                PaymentVoided { payment_id, order_id, reason: c.reason.clone() }.into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(mut self, event: &PaymentEvent) -> Self {
        match event {
            PaymentEvent::Authorized(e) => {
                self.id = e.payment_id.clone();
                self.order_id = e.order_id.clone();
                self.status = PaymentStatus::Authorized;
                self.authorized = Some(e.amount);
            }
            PaymentEvent::Declined(e) => {
                self.id = e.payment_id.clone();
                self.order_id = e.order_id.clone();
                self.status = PaymentStatus::Declined;
            }
            PaymentEvent::Captured(e) => self.captured += e.amount.minor,
            PaymentEvent::Refunded(e) => self.refunded += e.amount.minor,
            PaymentEvent::Voided(_) => self.status = PaymentStatus::Voided,
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn usd(minor: i64) -> Money {
        Money::new(minor, "USD".parse().unwrap())
    }

    fn authorize(minor: i64) -> AuthorizePayment {
        AuthorizePayment {
            payment_id: "p-1".into(),
            order_id: "o-1".into(),
            amount: usd(minor),
            order_total: usd(1000),
            provider_reference: "auth-1".into(),
        }
    }

    fn authorized(minor: i64) -> PaymentEvent {
        PaymentAuthorized {
            payment_id: "p-1".into(),
            order_id: "o-1".into(),
            amount: usd(minor),
            provider_reference: "auth-1".into(),
        }
        .into()
    }

    fn declined() -> PaymentEvent {
        PaymentDeclined { payment_id: "p-1".into(), order_id: "o-1".into(), amount: usd(1000), reason: "card".into() }
            .into()
    }

    fn captured(minor: i64) -> PaymentEvent {
        PaymentCaptured { payment_id: "p-1".into(), order_id: "o-1".into(), amount: usd(minor) }.into()
    }

    fn refunded(minor: i64) -> PaymentEvent {
        PaymentRefunded { payment_id: "p-1".into(), order_id: "o-1".into(), amount: usd(minor), reason: "r".into() }
            .into()
    }

    fn voided() -> PaymentEvent {
        PaymentVoided { payment_id: "p-1".into(), order_id: "o-1".into(), reason: "r".into() }.into()
    }

    fn refund(minor: i64) -> RefundPayment {
        RefundPayment { amount: usd(minor), reason: "r".into() }
    }

    #[test]
    fn authorize_up_to_the_order_total() {
        Scenario::<Payment>::given_no_events().when(authorize(1000)).then_expect([authorized(1000)]);
        Scenario::<Payment>::given_no_events().when(authorize(400)).then_expect([authorized(400)]);
        Scenario::<Payment>::given_no_events().when(authorize(1001)).then_reject(Reason::AmountExceedsOrderTotal);
        Scenario::<Payment>::given_no_events()
            .when(AuthorizePayment { amount: Money::new(10, "EUR".parse().unwrap()), ..authorize(0) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Payment>::given([authorized(1000)]).when(authorize(1000)).then_reject(Reason::PaymentAlreadyExists);
        Scenario::<Payment>::given_no_events()
            .when(AuthorizePayment { payment_id: String::new(), provider_reference: String::new(), ..authorize(0) })
            .then_invalid(&["payment_id", "amount.minor", "provider_reference"]);
    }

    #[test]
    fn decline_is_final() {
        let decline = DeclinePayment {
            payment_id: "p-1".into(),
            order_id: "o-1".into(),
            amount: usd(1000),
            reason: "card".into(),
        };
        Scenario::<Payment>::given_no_events().when(decline.clone()).then_expect([declined()]);
        Scenario::<Payment>::given([declined()]).when(decline.clone()).then_reject(Reason::PaymentAlreadyExists);
        Scenario::<Payment>::given([authorized(1000)]).when(decline.clone()).then_reject(Reason::PaymentAlreadyExists);
        Scenario::<Payment>::given([declined()])
            .when(CapturePayment { amount: usd(1) })
            .then_reject(Reason::PaymentDeclined);
        Scenario::<Payment>::given_no_events()
            .when(DeclinePayment { reason: String::new(), ..decline })
            .then_invalid(&["reason"]);
    }

    #[test]
    fn capture_up_to_the_authorized_amount() {
        Scenario::<Payment>::given([authorized(1000)])
            .when(CapturePayment { amount: usd(600) })
            .then_expect([captured(600)]);
        Scenario::<Payment>::given([authorized(1000), captured(600)])
            .when(CapturePayment { amount: usd(400) })
            .then_expect([captured(400)]);
        Scenario::<Payment>::given([authorized(1000), captured(600)])
            .when(CapturePayment { amount: usd(401) })
            .then_reject(Reason::AmountExceedsAuthorized);
        Scenario::<Payment>::given_no_events()
            .when(CapturePayment { amount: usd(1) })
            .then_reject(Reason::PaymentNotFound);
        Scenario::<Payment>::given([authorized(1000), voided()])
            .when(CapturePayment { amount: usd(1) })
            .then_reject(Reason::PaymentVoided);
        Scenario::<Payment>::given([authorized(1000)])
            .when(CapturePayment { amount: Money::new(1, "EUR".parse().unwrap()) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Payment>::given([authorized(1000)])
            .when(CapturePayment { amount: usd(-1) })
            .then_invalid(&["amount.minor"]);
    }

    #[test]
    fn refund_up_to_the_captured_amount() {
        Scenario::<Payment>::given([authorized(1000), captured(600)]).when(refund(600)).then_expect([refunded(600)]);
        Scenario::<Payment>::given([authorized(1000), captured(600), refunded(500)])
            .when(refund(101))
            .then_reject(Reason::AmountExceedsCaptured);
        Scenario::<Payment>::given([authorized(1000)]).when(refund(1)).then_reject(Reason::AmountExceedsCaptured);
        Scenario::<Payment>::given_no_events().when(refund(1)).then_reject(Reason::PaymentNotFound);
        Scenario::<Payment>::given([authorized(1000), voided()]).when(refund(1)).then_reject(Reason::PaymentVoided);
        Scenario::<Payment>::given([declined()]).when(refund(1)).then_reject(Reason::PaymentDeclined);
        Scenario::<Payment>::given([authorized(1000), captured(600)])
            .when(RefundPayment { amount: Money::new(1, "EUR".parse().unwrap()), reason: "r".into() })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Payment>::given([authorized(1000), captured(600)])
            .when(RefundPayment { amount: usd(1), reason: String::new() })
            .then_invalid(&["reason"]);
    }

    #[test]
    fn void_only_before_capture() {
        let void = VoidPayment { reason: "r".into() };
        Scenario::<Payment>::given([authorized(1000)]).when(void.clone()).then_expect([voided()]);
        Scenario::<Payment>::given([authorized(1000), captured(1)])
            .when(void.clone())
            .then_reject(Reason::PaymentAlreadyCaptured);
        Scenario::<Payment>::given([authorized(1000), voided()]).when(void.clone()).then_reject(Reason::PaymentVoided);
        Scenario::<Payment>::given_no_events().when(void.clone()).then_reject(Reason::PaymentNotFound);
        Scenario::<Payment>::given([declined()]).when(void).then_reject(Reason::PaymentDeclined);
        Scenario::<Payment>::given([authorized(1000)])
            .when(VoidPayment { reason: " ".into() })
            .then_invalid(&["reason"]);
    }
}
