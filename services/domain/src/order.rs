//! Orders: Created → Confirmed → Paid → Shipped; cancellable until shipped.
//! A payment is authorized, up to the order's total, while the order is
//! created or confirmed. An order has at least one item, every quantity is positive, all prices
//! are in the order's one currency, and the total is computed from the
//! items, never taken from the caller.

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Currency, Money, Reason, Rejection, Sensitive, Violation, check_id, check_text,
    event::{command_enum, domain_events},
    invalid_if_any,
};

/// Most items one order may hold.
pub const MAX_ITEMS: usize = 100;
/// Largest quantity of one item.
pub const MAX_QUANTITY: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: u32,
    pub unit_price: Money,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OrderStatus {
    /// No event yet: the order does not exist.
    #[default]
    New,
    Created,
    Confirmed,
    Paid,
    Shipped,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOrder {
    pub order_id: String,
    pub customer_id: String,
    pub currency: Currency,
    pub items: Vec<OrderItem>,
    /// The payment provider's token of the customer's payment method (e.g.
    /// `tok_visa`), for the fulfilment saga's authorization: never logged.
    pub payment_token: Option<Sensitive<String>>,
    /// The carrier to ship with (e.g. `DHL`), for the saga's label.
    pub carrier: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmOrder;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPayment {
    pub payment_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipOrder {
    pub carrier: String,
    pub tracking_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelOrder {
    pub reason: String,
}

command_enum! {
    pub enum OrderCommand {
        Create(CreateOrder),
        Confirm(ConfirmOrder),
        ProcessPayment(ProcessPayment),
        Ship(ShipOrder),
        Cancel(CancelOrder),
    }
}

/// Version 2: money as minor units and a currency (version 1 had decimal
/// strings and no currency; see [`crate::upcast`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: String,
    pub customer_id: String,
    pub currency: Currency,
    pub items: Vec<OrderItem>,
    pub total: Money,
    /// Absent in orders placed without one (and in every v1 event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_token: Option<Sensitive<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentProcessed {
    pub order_id: String,
    pub payment_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: String,
    pub carrier: String,
    pub tracking_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
}

domain_events! {
    pub enum OrderEvent {
        Created(OrderCreated) = 2,
        Confirmed(OrderConfirmed) = 1,
        PaymentProcessed(PaymentProcessed) = 1,
        Shipped(OrderShipped) = 1,
        Cancelled(OrderCancelled) = 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub status: OrderStatus,
    pub customer_id: String,
    pub items: Vec<OrderItem>,
    /// Set from creation on; its currency is the order's.
    pub total: Option<Money>,
    pub payment_id: Option<String>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub cancel_reason: Option<String>,
}

/// The total of `items` in `currency`, or the violations that prevent it.
pub fn order_total(currency: Currency, items: &[OrderItem]) -> Result<Money, Vec<Violation>> {
    let mut violations = Vec::new();
    let mut total = Some(Money::zero(currency));
    for (i, item) in items.iter().enumerate() {
        let field = |name: &str| format!("items[{i}].{name}");
        check_id(&field("product_id"), &item.product_id, &mut violations);
        if item.quantity == 0 || item.quantity > MAX_QUANTITY {
            violations.push(Violation::new(field("quantity"), format!("must be 1 to {MAX_QUANTITY}")));
        }
        if item.unit_price.minor < 0 {
            violations.push(Violation::new(field("unit_price.minor"), "must not be negative"));
        }
        if item.unit_price.currency != currency {
            violations.push(Violation::new(
                field("unit_price.currency"),
                format!("must be the order's currency {currency}, got {}", item.unit_price.currency),
            ));
        }
        total = total.and_then(|t| {
            item.unit_price.checked_mul(i64::from(item.quantity)).and_then(|line| t.checked_add(line)).ok()
        });
    }
    match total {
        Some(total) if violations.is_empty() => Ok(total),
        None if violations.is_empty() => Err(vec![Violation::new("items", "the order total is out of range")]),
        _ => Err(violations),
    }
}

impl Order {
    fn exists(&self) -> Result<(), Rejection> {
        match self.status {
            OrderStatus::New => Err(Rejection::rule(Reason::OrderNotFound, "the order does not exist")),
            _ => Ok(()),
        }
    }

    /// The rejection for a command that needs the order in `wanted` state.
    fn not_in(&self, wanted: OrderStatus) -> Rejection {
        let (reason, message) = match self.status {
            OrderStatus::New => (Reason::OrderNotFound, "the order does not exist"),
            OrderStatus::Cancelled => (Reason::OrderCancelled, "the order is cancelled"),
            OrderStatus::Shipped => (Reason::OrderAlreadyShipped, "the order is already shipped"),
            OrderStatus::Paid if wanted == OrderStatus::Confirmed => {
                (Reason::OrderAlreadyPaid, "the order is already paid")
            }
            OrderStatus::Paid | OrderStatus::Confirmed if wanted == OrderStatus::Created => {
                (Reason::OrderAlreadyConfirmed, "the order is already confirmed")
            }
            OrderStatus::Created if wanted == OrderStatus::Confirmed => {
                (Reason::OrderNotConfirmed, "the order is not confirmed yet")
            }
            _ => (Reason::OrderNotPaid, "the order is not paid yet"),
        };
        Rejection::rule(reason, message)
    }

    fn require(&self, wanted: OrderStatus) -> Result<(), Rejection> {
        if self.status == wanted { Ok(()) } else { Err(self.not_in(wanted)) }
    }

    /// The upper bound of a payment authorized for this order: its total,
    /// while the order is created or confirmed (not yet paid, and neither
    /// shipped nor cancelled).
    pub fn payable_total(&self) -> Result<Money, Rejection> {
        match self.status {
            // Every created order has a total; a state without one (which
            // no event sequence makes) is refused rather than trusted.
            OrderStatus::Created | OrderStatus::Confirmed => {
                self.total.ok_or_else(|| Rejection::rule(Reason::OrderNotFound, "the order has no total"))
            }
            // Paid: already paid; new, shipped, cancelled: as for payment.
            _ => Err(self.not_in(OrderStatus::Confirmed)),
        }
    }
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn creates(command: &OrderCommand) -> bool {
        matches!(command, OrderCommand::Create(_))
    }

    fn validate(command: &OrderCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            OrderCommand::Create(c) => {
                check_id("order_id", &c.order_id, &mut violations);
                check_id("customer_id", &c.customer_id, &mut violations);
                if c.items.is_empty() || c.items.len() > MAX_ITEMS {
                    violations.push(Violation::new("items", format!("must hold 1 to {MAX_ITEMS} items")));
                } else if let Err(v) = order_total(c.currency, &c.items) {
                    violations.extend(v);
                }
                if let Some(token) = &c.payment_token {
                    check_id("payment_token", token.expose(), &mut violations);
                }
                if let Some(carrier) = &c.carrier {
                    check_id("carrier", carrier, &mut violations);
                }
            }
            OrderCommand::Confirm(ConfirmOrder) => {}
            OrderCommand::ProcessPayment(c) => {
                check_id("payment_id", &c.payment_id, &mut violations);
                if c.amount.minor <= 0 {
                    violations.push(Violation::new("amount.minor", "must be positive"));
                }
            }
            OrderCommand::Ship(c) => {
                check_text("carrier", &c.carrier, 100, &mut violations);
                check_id("tracking_number", &c.tracking_number, &mut violations);
            }
            OrderCommand::Cancel(c) => check_text("reason", &c.reason, 500, &mut violations),
        }
        violations
    }

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        let order_id = self.id.clone();
        let event = match command {
            OrderCommand::Create(c) => {
                if self.status != OrderStatus::New {
                    return Err(Rejection::rule(Reason::OrderAlreadyExists, format!("order {} exists", self.id)));
                }
                let total = order_total(c.currency, &c.items).map_err(Rejection::Invalid)?;
                OrderCreated {
                    order_id: c.order_id.clone(),
                    customer_id: c.customer_id.clone(),
                    currency: c.currency,
                    items: c.items.clone(),
                    total,
                    payment_token: c.payment_token.clone(),
                    carrier: c.carrier.clone(),
                }
                .into()
            }
            OrderCommand::Confirm(ConfirmOrder) => {
                self.require(OrderStatus::Created)?;
                OrderConfirmed { order_id }.into()
            }
            OrderCommand::ProcessPayment(c) => {
                self.require(OrderStatus::Confirmed)?;
                let total = self.total.expect("a confirmed order has a total");
                if c.amount.currency != total.currency {
                    return Err(Rejection::rule(
                        Reason::CurrencyMismatch,
                        format!("payment in {}, order in {}", c.amount.currency, total.currency),
                    ));
                }
                if c.amount != total {
                    return Err(Rejection::rule(
                        Reason::PaymentAmountMismatch,
                        format!("payment of {} for an order total of {}", c.amount.minor, total.minor),
                    ));
                }
                PaymentProcessed { order_id, payment_id: c.payment_id.clone(), amount: c.amount }.into()
            }
            OrderCommand::Ship(c) => {
                self.require(OrderStatus::Paid)?;
                OrderShipped { order_id, carrier: c.carrier.clone(), tracking_number: c.tracking_number.clone() }.into()
            }
            OrderCommand::Cancel(c) => {
                self.exists()?;
                match self.status {
                    OrderStatus::Shipped | OrderStatus::Cancelled => return Err(self.not_in(OrderStatus::Created)),
                    _ => OrderCancelled { order_id, reason: c.reason.clone() }.into(),
                }
            }
        };
        Ok(vec![event])
    }

    fn evolve(mut self, event: &OrderEvent) -> Self {
        match event {
            OrderEvent::Created(e) => {
                self.id = e.order_id.clone();
                self.status = OrderStatus::Created;
                self.customer_id = e.customer_id.clone();
                self.items = e.items.clone();
                self.total = Some(e.total);
            }
            OrderEvent::Confirmed(_) => self.status = OrderStatus::Confirmed,
            OrderEvent::PaymentProcessed(e) => {
                self.status = OrderStatus::Paid;
                self.payment_id = Some(e.payment_id.clone());
            }
            OrderEvent::Shipped(e) => {
                self.status = OrderStatus::Shipped;
                self.carrier = Some(e.carrier.clone());
                self.tracking_number = Some(e.tracking_number.clone());
            }
            OrderEvent::Cancelled(e) => {
                self.status = OrderStatus::Cancelled;
                self.cancel_reason = Some(e.reason.clone());
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DomainEvent, testing::Scenario};

    fn usd(minor: i64) -> Money {
        Money::new(minor, "USD".parse().unwrap())
    }

    fn item(product: &str, quantity: u32, price: i64) -> OrderItem {
        OrderItem { product_id: product.into(), quantity, unit_price: usd(price) }
    }

    fn create() -> CreateOrder {
        CreateOrder {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            currency: "USD".parse().unwrap(),
            items: vec![item("sku-1", 2, 1250), item("sku-2", 1, 500)],
            payment_token: Some("tok_visa".into()),
            carrier: Some("DHL".into()),
        }
    }

    fn created() -> OrderEvent {
        OrderCreated {
            order_id: "o-1".into(),
            customer_id: "c-1".into(),
            currency: "USD".parse().unwrap(),
            items: create().items,
            total: usd(3000),
            payment_token: Some("tok_visa".into()),
            carrier: Some("DHL".into()),
        }
        .into()
    }

    fn confirmed() -> OrderEvent {
        OrderConfirmed { order_id: "o-1".into() }.into()
    }

    fn paid() -> OrderEvent {
        PaymentProcessed { order_id: "o-1".into(), payment_id: "p-1".into(), amount: usd(3000) }.into()
    }

    fn shipped() -> OrderEvent {
        OrderShipped { order_id: "o-1".into(), carrier: "DHL".into(), tracking_number: "T-1".into() }.into()
    }

    fn cancelled() -> OrderEvent {
        OrderCancelled { order_id: "o-1".into(), reason: "customer asked".into() }.into()
    }

    fn pay(minor: i64) -> ProcessPayment {
        ProcessPayment { payment_id: "p-1".into(), amount: usd(minor) }
    }

    fn ship() -> ShipOrder {
        ShipOrder { carrier: "DHL".into(), tracking_number: "T-1".into() }
    }

    fn cancel() -> CancelOrder {
        CancelOrder { reason: "customer asked".into() }
    }

    #[test]
    fn create_computes_the_total_from_the_items() {
        Scenario::<Order>::given_no_events().when(create()).then_expect([created()]);
    }

    #[test]
    fn create_twice_is_rejected() {
        Scenario::<Order>::given([created()]).when(create()).then_reject(Reason::OrderAlreadyExists);
    }

    #[test]
    fn checkout_details_are_optional_but_must_be_well_formed() {
        let without = CreateOrder { payment_token: None, carrier: None, ..create() };
        let OrderEvent::Created(event) = Order::default().decide(&OrderCommand::Create(without)).unwrap().remove(0)
        else {
            panic!("not OrderCreated")
        };
        assert_eq!((&event.payment_token, &event.carrier), (&None, &None));
        let json = serde_json::to_value(&event).unwrap();
        assert!(json.get("payment_token").is_none() && json.get("carrier").is_none(), "absent, not null: {json}");
        Scenario::<Order>::given_no_events()
            .when(CreateOrder { payment_token: Some("tok visa".into()), carrier: Some(String::new()), ..create() })
            .then_invalid(&["payment_token", "carrier"]);
    }

    #[test]
    fn the_payment_token_is_masked_and_its_violation_names_the_field_not_the_value() {
        let bad = "tok with spaces";
        let command = OrderCommand::Create(CreateOrder { payment_token: Some(bad.into()), ..create() });
        let Err(rejection) = Order::default().decide(&command) else { panic!("a token with spaces is refused") };
        let text = format!("{command:?} {rejection:?}");
        assert!(!text.contains(bad) && text.contains("<redacted>"), "{text}");
        let events = Order::default().decide(&create().into()).unwrap();
        let text = format!("{events:?} {:?}", Order::default().fold(&events));
        assert!(!text.contains("tok_visa"), "{text}");
        let json = events[0].to_data();
        assert_eq!(json["payment_token"], "tok_visa", "the stored event keeps the value");
    }

    #[test]
    fn create_without_items_is_invalid() {
        Scenario::<Order>::given_no_events().when(CreateOrder { items: vec![], ..create() }).then_invalid(&["items"]);
    }

    #[test]
    fn create_with_bad_items_names_each_field() {
        let items = vec![
            item("sku-1", 0, 100),
            OrderItem { unit_price: Money::new(100, "EUR".parse().unwrap()), ..item("sku-2", 1, 0) },
            item("", 1, -5),
        ];
        Scenario::<Order>::given_no_events()
            .when(CreateOrder { items, order_id: String::new(), ..create() })
            .then_invalid(&[
                "order_id",
                "items[0].quantity",
                "items[1].unit_price.currency",
                "items[2].product_id",
                "items[2].unit_price.minor",
            ]);
    }

    #[test]
    fn create_with_an_overflowing_total_is_invalid() {
        let items = vec![item("a", MAX_QUANTITY, i64::MAX / 2), item("b", 1, 1)];
        Scenario::<Order>::given_no_events().when(CreateOrder { items, ..create() }).then_invalid(&["items"]);
    }

    #[test]
    fn confirm_follows_create() {
        Scenario::<Order>::given([created()]).when(ConfirmOrder).then_expect([confirmed()]);
    }

    #[test]
    fn confirm_is_rejected_in_every_other_state() {
        Scenario::<Order>::given_no_events().when(ConfirmOrder).then_reject(Reason::OrderNotFound);
        Scenario::<Order>::given([created(), confirmed()])
            .when(ConfirmOrder)
            .then_reject(Reason::OrderAlreadyConfirmed);
        Scenario::<Order>::given([created(), confirmed(), paid()])
            .when(ConfirmOrder)
            .then_reject(Reason::OrderAlreadyConfirmed);
        Scenario::<Order>::given([created(), confirmed(), paid(), shipped()])
            .when(ConfirmOrder)
            .then_reject(Reason::OrderAlreadyShipped);
        Scenario::<Order>::given([created(), cancelled()]).when(ConfirmOrder).then_reject(Reason::OrderCancelled);
    }

    #[test]
    fn payment_of_the_total_marks_a_confirmed_order_paid() {
        Scenario::<Order>::given([created(), confirmed()]).when(pay(3000)).then_expect([paid()]);
    }

    #[test]
    fn payment_is_rejected_unless_confirmed_and_exact() {
        Scenario::<Order>::given_no_events().when(pay(3000)).then_reject(Reason::OrderNotFound);
        Scenario::<Order>::given([created()]).when(pay(3000)).then_reject(Reason::OrderNotConfirmed);
        Scenario::<Order>::given([created(), confirmed()]).when(pay(2999)).then_reject(Reason::PaymentAmountMismatch);
        Scenario::<Order>::given([created(), confirmed()])
            .when(ProcessPayment { amount: Money::new(3000, "EUR".parse().unwrap()), ..pay(0) })
            .then_reject(Reason::CurrencyMismatch);
        Scenario::<Order>::given([created(), confirmed(), paid()])
            .when(pay(3000))
            .then_reject(Reason::OrderAlreadyPaid);
        Scenario::<Order>::given([created(), confirmed(), paid(), shipped()])
            .when(pay(3000))
            .then_reject(Reason::OrderAlreadyShipped);
        Scenario::<Order>::given([created(), confirmed(), cancelled()])
            .when(pay(3000))
            .then_reject(Reason::OrderCancelled);
        Scenario::<Order>::given([created(), confirmed()]).when(pay(0)).then_invalid(&["amount.minor"]);
    }

    #[test]
    fn a_payment_is_authorized_against_the_total_of_a_created_or_confirmed_order() {
        let reason = |events: &[OrderEvent]| Order::default().fold(events).payable_total().unwrap_err().reason();
        assert_eq!(Order::default().fold(&[created()]).payable_total(), Ok(usd(3000)));
        assert_eq!(Order::default().fold(&[created(), confirmed()]).payable_total(), Ok(usd(3000)));
        assert_eq!(reason(&[]), Some(Reason::OrderNotFound));
        assert_eq!(reason(&[created(), confirmed(), paid()]), Some(Reason::OrderAlreadyPaid));
        assert_eq!(reason(&[created(), confirmed(), paid(), shipped()]), Some(Reason::OrderAlreadyShipped));
        assert_eq!(reason(&[created(), cancelled()]), Some(Reason::OrderCancelled));
        let without_total = Order { status: OrderStatus::Confirmed, total: None, ..Order::default() };
        assert_eq!(without_total.payable_total().unwrap_err().reason(), Some(Reason::OrderNotFound));
    }

    #[test]
    fn shipping_follows_payment() {
        Scenario::<Order>::given([created(), confirmed(), paid()]).when(ship()).then_expect([shipped()]);
    }

    #[test]
    fn shipping_is_rejected_unless_paid() {
        Scenario::<Order>::given_no_events().when(ship()).then_reject(Reason::OrderNotFound);
        Scenario::<Order>::given([created()]).when(ship()).then_reject(Reason::OrderNotPaid);
        Scenario::<Order>::given([created(), confirmed()]).when(ship()).then_reject(Reason::OrderNotPaid);
        Scenario::<Order>::given([created(), confirmed(), paid(), shipped()])
            .when(ship())
            .then_reject(Reason::OrderAlreadyShipped);
        Scenario::<Order>::given([created(), cancelled()]).when(ship()).then_reject(Reason::OrderCancelled);
        Scenario::<Order>::given([created(), confirmed(), paid()])
            .when(ShipOrder { carrier: " ".into(), tracking_number: "has space".into() })
            .then_invalid(&["carrier", "tracking_number"]);
    }

    #[test]
    fn cancel_is_allowed_until_shipped() {
        Scenario::<Order>::given([created()]).when(cancel()).then_expect([cancelled()]);
        Scenario::<Order>::given([created(), confirmed()]).when(cancel()).then_expect([cancelled()]);
        Scenario::<Order>::given([created(), confirmed(), paid()]).when(cancel()).then_expect([cancelled()]);
    }

    #[test]
    fn cancel_is_rejected_after_shipping_or_cancelling() {
        Scenario::<Order>::given_no_events().when(cancel()).then_reject(Reason::OrderNotFound);
        Scenario::<Order>::given([created(), confirmed(), paid(), shipped()])
            .when(cancel())
            .then_reject(Reason::OrderAlreadyShipped);
        Scenario::<Order>::given([created(), cancelled()]).when(cancel()).then_reject(Reason::OrderCancelled);
        Scenario::<Order>::given([created()]).when(CancelOrder { reason: String::new() }).then_invalid(&["reason"]);
    }

    #[test]
    fn evolve_keeps_what_the_events_say() {
        let order = Order::default().fold(&[created(), confirmed(), paid(), shipped()]);
        assert_eq!(order.status, OrderStatus::Shipped);
        assert_eq!(order.total, Some(usd(3000)));
        assert_eq!(order.payment_id.as_deref(), Some("p-1"));
        assert_eq!(order.tracking_number.as_deref(), Some("T-1"));
    }
}
