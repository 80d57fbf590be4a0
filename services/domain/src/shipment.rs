//! A shipment of one order: Created (label made) → Dispatched → Delivered;
//! cancellable only before dispatch.

use serde::{Deserialize, Serialize};

use crate::{
    Aggregate, Reason, Rejection, Violation, check_id, check_text,
    event::{command_enum, domain_events},
    invalid_if_any,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ShipmentStatus {
    #[default]
    New,
    Created,
    Dispatched,
    Delivered,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateShipment {
    pub shipment_id: String,
    pub order_id: String,
    pub carrier: String,
    /// The carrier's label / tracking number.
    pub tracking_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchShipment;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverShipment;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelShipment {
    pub reason: String,
}

command_enum! {
    pub enum ShipmentCommand {
        Create(CreateShipment),
        Dispatch(DispatchShipment),
        Deliver(DeliverShipment),
        Cancel(CancelShipment),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCreated {
    pub shipment_id: String,
    pub order_id: String,
    pub carrier: String,
    pub tracking_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub shipment_id: String,
    pub order_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentDelivered {
    pub shipment_id: String,
    pub order_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentCancelled {
    pub shipment_id: String,
    pub order_id: String,
    pub reason: String,
}

domain_events! {
    pub enum ShipmentEvent {
        Created(ShipmentCreated) = 1,
        Dispatched(ShipmentDispatched) = 1,
        Delivered(ShipmentDelivered) = 1,
        Cancelled(ShipmentCancelled) = 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Shipment {
    pub id: String,
    pub order_id: String,
    pub status: ShipmentStatus,
    pub carrier: String,
    pub tracking_number: String,
}

impl Shipment {
    /// Passes when the shipment is in `wanted`, otherwise says why not.
    fn require(&self, wanted: ShipmentStatus) -> Result<(), Rejection> {
        let (reason, message) = match self.status {
            s if s == wanted => return Ok(()),
            ShipmentStatus::New => (Reason::ShipmentNotFound, "the shipment does not exist"),
            ShipmentStatus::Cancelled => (Reason::ShipmentCancelled, "the shipment is cancelled"),
            ShipmentStatus::Delivered => (Reason::ShipmentAlreadyDelivered, "the shipment is already delivered"),
            ShipmentStatus::Dispatched => (Reason::ShipmentAlreadyDispatched, "the shipment is already dispatched"),
            ShipmentStatus::Created => (Reason::ShipmentNotDispatched, "the shipment is not dispatched yet"),
        };
        Err(Rejection::rule(reason, message))
    }
}

impl Aggregate for Shipment {
    const CATEGORY: &'static str = "shipment";
    type Command = ShipmentCommand;
    type Event = ShipmentEvent;

    fn creates(command: &ShipmentCommand) -> bool {
        matches!(command, ShipmentCommand::Create(_))
    }

    fn validate(command: &ShipmentCommand) -> Vec<Violation> {
        let mut violations = Vec::new();
        match command {
            ShipmentCommand::Create(c) => {
                check_id("shipment_id", &c.shipment_id, &mut violations);
                check_id("order_id", &c.order_id, &mut violations);
                check_text("carrier", &c.carrier, 100, &mut violations);
                check_id("tracking_number", &c.tracking_number, &mut violations);
            }
            ShipmentCommand::Dispatch(_) | ShipmentCommand::Deliver(_) => {}
            ShipmentCommand::Cancel(c) => check_text("reason", &c.reason, 500, &mut violations),
        }
        violations
    }

    fn decide(&self, command: &ShipmentCommand) -> Result<Vec<ShipmentEvent>, Rejection> {
        invalid_if_any(Self::validate(command))?;
        let (shipment_id, order_id) = (self.id.clone(), self.order_id.clone());
        let event = match command {
            ShipmentCommand::Create(c) => {
                if self.status != ShipmentStatus::New {
                    return Err(Rejection::rule(Reason::ShipmentAlreadyExists, format!("shipment {} exists", self.id)));
                }
                ShipmentCreated {
                    shipment_id: c.shipment_id.clone(),
                    order_id: c.order_id.clone(),
                    carrier: c.carrier.clone(),
                    tracking_number: c.tracking_number.clone(),
                }
                .into()
            }
            ShipmentCommand::Dispatch(_) => {
                self.require(ShipmentStatus::Created)?;
                ShipmentDispatched { shipment_id, order_id }.into()
            }
            ShipmentCommand::Deliver(_) => {
                self.require(ShipmentStatus::Dispatched)?;
                ShipmentDelivered { shipment_id, order_id }.into()
            }
            ShipmentCommand::Cancel(c) => {
                self.require(ShipmentStatus::Created)?;
                ShipmentCancelled { shipment_id, order_id, reason: c.reason.clone() }.into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(mut self, event: &ShipmentEvent) -> Self {
        match event {
            ShipmentEvent::Created(e) => {
                self.id = e.shipment_id.clone();
                self.order_id = e.order_id.clone();
                self.carrier = e.carrier.clone();
                self.tracking_number = e.tracking_number.clone();
                self.status = ShipmentStatus::Created;
            }
            ShipmentEvent::Dispatched(_) => self.status = ShipmentStatus::Dispatched,
            ShipmentEvent::Delivered(_) => self.status = ShipmentStatus::Delivered,
            ShipmentEvent::Cancelled(_) => self.status = ShipmentStatus::Cancelled,
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scenario;

    fn create() -> CreateShipment {
        CreateShipment {
            shipment_id: "s-1".into(),
            order_id: "o-1".into(),
            carrier: "DHL".into(),
            tracking_number: "T-1".into(),
        }
    }

    fn created() -> ShipmentEvent {
        ShipmentCreated {
            shipment_id: "s-1".into(),
            order_id: "o-1".into(),
            carrier: "DHL".into(),
            tracking_number: "T-1".into(),
        }
        .into()
    }

    fn dispatched() -> ShipmentEvent {
        ShipmentDispatched { shipment_id: "s-1".into(), order_id: "o-1".into() }.into()
    }

    fn delivered() -> ShipmentEvent {
        ShipmentDelivered { shipment_id: "s-1".into(), order_id: "o-1".into() }.into()
    }

    fn cancelled() -> ShipmentEvent {
        ShipmentCancelled { shipment_id: "s-1".into(), order_id: "o-1".into(), reason: "r".into() }.into()
    }

    fn cancel() -> CancelShipment {
        CancelShipment { reason: "r".into() }
    }

    #[test]
    fn create_once() {
        Scenario::<Shipment>::given_no_events().when(create()).then_expect([created()]);
        Scenario::<Shipment>::given([created()]).when(create()).then_reject(Reason::ShipmentAlreadyExists);
        Scenario::<Shipment>::given_no_events()
            .when(CreateShipment { carrier: String::new(), tracking_number: "a b".into(), ..create() })
            .then_invalid(&["carrier", "tracking_number"]);
    }

    #[test]
    fn dispatch_after_create() {
        Scenario::<Shipment>::given([created()]).when(DispatchShipment).then_expect([dispatched()]);
        Scenario::<Shipment>::given_no_events().when(DispatchShipment).then_reject(Reason::ShipmentNotFound);
        Scenario::<Shipment>::given([created(), dispatched()])
            .when(DispatchShipment)
            .then_reject(Reason::ShipmentAlreadyDispatched);
        Scenario::<Shipment>::given([created(), dispatched(), delivered()])
            .when(DispatchShipment)
            .then_reject(Reason::ShipmentAlreadyDelivered);
        Scenario::<Shipment>::given([created(), cancelled()])
            .when(DispatchShipment)
            .then_reject(Reason::ShipmentCancelled);
    }

    #[test]
    fn deliver_after_dispatch() {
        Scenario::<Shipment>::given([created(), dispatched()]).when(DeliverShipment).then_expect([delivered()]);
        Scenario::<Shipment>::given([created()]).when(DeliverShipment).then_reject(Reason::ShipmentNotDispatched);
        Scenario::<Shipment>::given_no_events().when(DeliverShipment).then_reject(Reason::ShipmentNotFound);
        Scenario::<Shipment>::given([created(), dispatched(), delivered()])
            .when(DeliverShipment)
            .then_reject(Reason::ShipmentAlreadyDelivered);
        Scenario::<Shipment>::given([created(), cancelled()])
            .when(DeliverShipment)
            .then_reject(Reason::ShipmentCancelled);
    }

    #[test]
    fn cancel_only_before_dispatch() {
        Scenario::<Shipment>::given([created()]).when(cancel()).then_expect([cancelled()]);
        Scenario::<Shipment>::given([created(), dispatched()])
            .when(cancel())
            .then_reject(Reason::ShipmentAlreadyDispatched);
        Scenario::<Shipment>::given([created(), cancelled()]).when(cancel()).then_reject(Reason::ShipmentCancelled);
        Scenario::<Shipment>::given_no_events().when(cancel()).then_reject(Reason::ShipmentNotFound);
        Scenario::<Shipment>::given([created()])
            .when(CancelShipment { reason: String::new() })
            .then_invalid(&["reason"]);
    }
}
