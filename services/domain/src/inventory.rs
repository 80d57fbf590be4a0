//! Inventory of one product: stock on hand is available plus reserved.
//! Available never goes below zero; a reservation belongs to one order and
//! is either released (back to available) or consumed (shipped) exactly
//! once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Reason, Rejection, Violation, check_id, check_text,
    event::{command_enum, domain_events},
    invalid_if_any,
};

/// Largest quantity one command moves.
pub const MAX_QUANTITY: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterProduct {
    pub product_id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplenishStock {
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveStock {
    pub order_id: String,
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseReservation {
    pub order_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeReservation {
    pub order_id: String,
}

command_enum! {
    pub enum InventoryCommand {
        Register(RegisterProduct),
        Replenish(ReplenishStock),
        Reserve(ReserveStock),
        Release(ReleaseReservation),
        Consume(ConsumeReservation),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductRegistered {
    pub product_id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReplenished {
    pub product_id: String,
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub product_id: String,
    pub order_id: String,
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    pub product_id: String,
    pub order_id: String,
    pub quantity: u32,
    pub reason: String,
}

/// The reserved stock left the warehouse (the order shipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryConsumed {
    pub product_id: String,
    pub order_id: String,
    pub quantity: u32,
}

domain_events! {
    pub enum InventoryEvent {
        Registered(ProductRegistered) = 1,
        Replenished(StockReplenished) = 1,
        Reserved(InventoryReserved) = 1,
        Released(InventoryReleased) = 1,
        Consumed(InventoryConsumed) = 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    pub product_id: String,
    pub name: String,
    pub registered: bool,
    pub available: u64,
    /// Open reservations: order id → quantity.
    pub reservations: BTreeMap<String, u32>,
    /// Orders whose reservation was released or consumed.
    pub closed: BTreeSet<String>,
    /// Everything consumed (shipped) so far.
    pub consumed: u64,
}

impl Inventory {
    pub fn reserved(&self) -> u64 {
        self.reservations.values().map(|&q| u64::from(q)).sum()
    }

    /// Stock on hand: available plus reserved.
    pub fn on_hand(&self) -> u64 {
        self.available + self.reserved()
    }

    fn open_reservation(&self, order_id: &str) -> Result<u32, Rejection> {
        if let Some(&quantity) = self.reservations.get(order_id) {
            return Ok(quantity);
        }
        if self.closed.contains(order_id) {
            Err(Rejection::rule(
                Reason::ReservationClosed,
                format!("the reservation of order {order_id} was already released or consumed"),
            ))
        } else {
            Err(Rejection::rule(Reason::ReservationNotFound, format!("order {order_id} holds no reservation")))
        }
    }
}

fn check_quantity(quantity: u32, violations: &mut Vec<Violation>) {
    if quantity == 0 || quantity > MAX_QUANTITY {
        violations.push(Violation::new("quantity", format!("must be 1 to {MAX_QUANTITY}")));
    }
}

impl Aggregate for Inventory {
    const CATEGORY: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;

    fn creates(command: &InventoryCommand) -> bool {
        matches!(command, InventoryCommand::Register(_))
    }

    fn validate(command: &InventoryCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            InventoryCommand::Register(c) => {
                check_id("product_id", &c.product_id, &mut violations);
                check_text("name", &c.name, 200, &mut violations);
            }
            InventoryCommand::Replenish(c) => check_quantity(c.quantity, &mut violations),
            InventoryCommand::Reserve(c) => {
                check_id("order_id", &c.order_id, &mut violations);
                check_quantity(c.quantity, &mut violations);
            }
            InventoryCommand::Release(c) => {
                check_id("order_id", &c.order_id, &mut violations);
                check_text("reason", &c.reason, 500, &mut violations);
            }
            InventoryCommand::Consume(c) => check_id("order_id", &c.order_id, &mut violations),
        }
        violations
    }

    fn decide(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        if let InventoryCommand::Register(c) = command {
            if self.registered {
                return Err(Rejection::rule(
                    Reason::ProductAlreadyExists,
                    format!("product {} is registered", self.product_id),
                ));
            }
            return Ok(vec![ProductRegistered { product_id: c.product_id.clone(), name: c.name.clone() }.into()]);
        }
        if !self.registered {
            return Err(Rejection::rule(Reason::ProductNotFound, "the product is not registered"));
        }
        let product_id = self.product_id.clone();
        let event = match command {
            InventoryCommand::Register(_) => unreachable!("handled above"),
            InventoryCommand::Replenish(c) => StockReplenished { product_id, quantity: c.quantity }.into(),
            InventoryCommand::Reserve(c) => {
                if self.reservations.contains_key(&c.order_id) {
                    return Err(Rejection::rule(
                        Reason::ReservationExists,
                        format!("order {} already holds a reservation", c.order_id),
                    ));
                }
                if self.closed.contains(&c.order_id) {
                    return Err(Rejection::rule(
                        Reason::ReservationClosed,
                        format!("the reservation of order {} was already released or consumed", c.order_id),
                    ));
                }
                if u64::from(c.quantity) > self.available {
                    return Err(Rejection::rule(
                        Reason::InsufficientStock,
                        format!("{} requested, {} available", c.quantity, self.available),
                    ));
                }
                InventoryReserved { product_id, order_id: c.order_id.clone(), quantity: c.quantity }.into()
            }
            InventoryCommand::Release(c) => {
                let quantity = self.open_reservation(&c.order_id)?;
                InventoryReleased { product_id, order_id: c.order_id.clone(), quantity, reason: c.reason.clone() }
                    .into()
            }
            InventoryCommand::Consume(c) => {
                let quantity = self.open_reservation(&c.order_id)?;
                InventoryConsumed { product_id, order_id: c.order_id.clone(), quantity }.into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(mut self, event: &InventoryEvent) -> Self {
        match event {
            InventoryEvent::Registered(e) => {
                self.registered = true;
                self.product_id = e.product_id.clone();
                self.name = e.name.clone();
            }
            InventoryEvent::Replenished(e) => self.available += u64::from(e.quantity),
            InventoryEvent::Reserved(e) => {
                self.available = self.available.saturating_sub(u64::from(e.quantity));
                self.reservations.insert(e.order_id.clone(), e.quantity);
            }
            InventoryEvent::Released(e) => {
                if let Some(quantity) = self.reservations.remove(&e.order_id) {
                    self.available += u64::from(quantity);
                }
                self.closed.insert(e.order_id.clone());
            }
            InventoryEvent::Consumed(e) => {
                if let Some(quantity) = self.reservations.remove(&e.order_id) {
                    self.consumed += u64::from(quantity);
                }
                self.closed.insert(e.order_id.clone());
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn registered() -> InventoryEvent {
        ProductRegistered { product_id: "sku-1".into(), name: "Widget".into() }.into()
    }

    fn replenished(quantity: u32) -> InventoryEvent {
        StockReplenished { product_id: "sku-1".into(), quantity }.into()
    }

    fn reserved(order: &str, quantity: u32) -> InventoryEvent {
        InventoryReserved { product_id: "sku-1".into(), order_id: order.into(), quantity }.into()
    }

    fn released(order: &str, quantity: u32) -> InventoryEvent {
        InventoryReleased { product_id: "sku-1".into(), order_id: order.into(), quantity, reason: "cancelled".into() }
            .into()
    }

    fn consumed(order: &str, quantity: u32) -> InventoryEvent {
        InventoryConsumed { product_id: "sku-1".into(), order_id: order.into(), quantity }.into()
    }

    fn reserve(order: &str, quantity: u32) -> ReserveStock {
        ReserveStock { order_id: order.into(), quantity }
    }

    fn release(order: &str) -> ReleaseReservation {
        ReleaseReservation { order_id: order.into(), reason: "cancelled".into() }
    }

    #[test]
    fn register_once() {
        let register = RegisterProduct { product_id: "sku-1".into(), name: "Widget".into() };
        Scenario::<Inventory>::given_no_events().when(register.clone()).then_expect([registered()]);
        Scenario::<Inventory>::given([registered()]).when(register).then_reject(Reason::ProductAlreadyExists);
        Scenario::<Inventory>::given_no_events()
            .when(RegisterProduct { product_id: "a b".into(), name: "".into() })
            .then_invalid(&["product_id", "name"]);
    }

    #[test]
    fn replenish_adds_to_available() {
        let state = Scenario::<Inventory>::given([registered()])
            .when(ReplenishStock { quantity: 5 })
            .then_expect([replenished(5)]);
        assert_eq!((state.available, state.on_hand()), (5, 5));
        Scenario::<Inventory>::given_no_events()
            .when(ReplenishStock { quantity: 5 })
            .then_reject(Reason::ProductNotFound);
        Scenario::<Inventory>::given([registered()]).when(ReplenishStock { quantity: 0 }).then_invalid(&["quantity"]);
    }

    #[test]
    fn reserve_moves_available_to_reserved() {
        let state = Scenario::<Inventory>::given([registered(), replenished(5)])
            .when(reserve("o-1", 3))
            .then_expect([reserved("o-1", 3)]);
        assert_eq!((state.available, state.reserved(), state.on_hand()), (2, 3, 5));
    }

    #[test]
    fn reserve_never_oversells() {
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3)])
            .when(reserve("o-2", 3))
            .then_reject(Reason::InsufficientStock);
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3)])
            .when(reserve("o-2", 2))
            .then_expect([reserved("o-2", 2)]);
    }

    #[test]
    fn reserve_is_once_per_order() {
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 1)])
            .when(reserve("o-1", 1))
            .then_reject(Reason::ReservationExists);
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 1), released("o-1", 1)])
            .when(reserve("o-1", 1))
            .then_reject(Reason::ReservationClosed);
        Scenario::<Inventory>::given_no_events().when(reserve("o-1", 1)).then_reject(Reason::ProductNotFound);
        Scenario::<Inventory>::given([registered()]).when(reserve("", 0)).then_invalid(&["order_id", "quantity"]);
    }

    #[test]
    fn release_returns_the_reservation_once() {
        let state = Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3)])
            .when(release("o-1"))
            .then_expect([released("o-1", 3)]);
        assert_eq!((state.available, state.reserved()), (5, 0));
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3), released("o-1", 3)])
            .when(release("o-1"))
            .then_reject(Reason::ReservationClosed);
        Scenario::<Inventory>::given([registered(), replenished(5)])
            .when(release("o-1"))
            .then_reject(Reason::ReservationNotFound);
        Scenario::<Inventory>::given_no_events().when(release("o-1")).then_reject(Reason::ProductNotFound);
        Scenario::<Inventory>::given([registered()])
            .when(ReleaseReservation { order_id: "o-1".into(), reason: "\n".into() })
            .then_invalid(&["reason"]);
    }

    #[test]
    fn consume_ships_the_reservation_once() {
        let state = Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3)])
            .when(ConsumeReservation { order_id: "o-1".into() })
            .then_expect([consumed("o-1", 3)]);
        assert_eq!((state.available, state.reserved(), state.consumed, state.on_hand()), (2, 0, 3, 2));
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3), consumed("o-1", 3)])
            .when(ConsumeReservation { order_id: "o-1".into() })
            .then_reject(Reason::ReservationClosed);
        Scenario::<Inventory>::given([registered(), replenished(5), reserved("o-1", 3), consumed("o-1", 3)])
            .when(release("o-1"))
            .then_reject(Reason::ReservationClosed);
        Scenario::<Inventory>::given([registered()])
            .when(ConsumeReservation { order_id: "o-9".into() })
            .then_reject(Reason::ReservationNotFound);
        Scenario::<Inventory>::given_no_events()
            .when(ConsumeReservation { order_id: "o-9".into() })
            .then_reject(Reason::ProductNotFound);
        Scenario::<Inventory>::given([registered()])
            .when(ConsumeReservation { order_id: String::new() })
            .then_invalid(&["order_id"]);
    }
}
