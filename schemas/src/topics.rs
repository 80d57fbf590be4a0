//! Topics and subjects: one Kafka topic per aggregate category, named like
//! the proto package of its events, and Confluent's
//! TopicRecordNameStrategy for the subjects.

use eventfold_domain::{
    DomainEvent, account::AccountEvent, inventory::InventoryEvent, order::OrderEvent, payment::PaymentEvent,
    saga::SagaEvent, shipment::ShipmentEvent, user::UserEvent,
};

/// An aggregate category and its topic.
#[derive(Debug, Clone, Copy)]
pub struct Category {
    /// The stream id prefix, e.g. `order` for `order-42`.
    pub prefix: &'static str,
    /// The topic, which is also the proto package of the events.
    pub topic: &'static str,
    /// Its event types with their current schema versions.
    pub types: &'static [(&'static str, u32)],
}

/// Every aggregate category of the domain.
pub const CATEGORIES: &[Category] = &[
    Category { prefix: "order", topic: "eventfold.orders.v1", types: OrderEvent::TYPES },
    Category { prefix: "inventory", topic: "eventfold.inventory.v1", types: InventoryEvent::TYPES },
    Category { prefix: "payment", topic: "eventfold.payments.v1", types: PaymentEvent::TYPES },
    Category { prefix: "shipment", topic: "eventfold.shipping.v1", types: ShipmentEvent::TYPES },
    Category { prefix: "account", topic: "eventfold.accounts.v1", types: AccountEvent::TYPES },
    Category { prefix: "user", topic: "eventfold.users.v1", types: UserEvent::TYPES },
    // Not an aggregate: the sagas' lifecycle events.
    Category { prefix: "saga", topic: "eventfold.sagas.v1", types: SagaEvent::TYPES },
];

/// An event type the domain writes, with its current schema version and
/// its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType {
    pub name: &'static str,
    pub current_version: u32,
    pub topic: &'static str,
}

/// Every event type of the domain, category by category.
pub fn event_types() -> impl Iterator<Item = EventType> {
    CATEGORIES.iter().flat_map(|c| {
        c.types.iter().map(|(name, version)| EventType { name, current_version: *version, topic: c.topic })
    })
}

/// The topic of a stream: its category is the id's prefix before the first
/// `-` (`order-42` → `eventfold.orders.v1`); a category the domain does
/// not know gets `eventfold.<category>.v1`.
pub fn topic_for_stream(stream_id: &str) -> String {
    let category = stream_id.split_once('-').map_or(stream_id, |(category, _)| category);
    match CATEGORIES.iter().find(|c| c.prefix == category) {
        Some(c) => c.topic.to_owned(),
        None => format!("eventfold.{category}.v1"),
    }
}

/// The topic of an event type: the one of the domain enum that lists it.
pub fn topic_for_event(event_type: &str) -> Option<&'static str> {
    CATEGORIES.iter().find(|c| c.types.iter().any(|(t, _)| *t == event_type)).map(|c| c.topic)
}

/// The subject of a record on a topic (TopicRecordNameStrategy):
/// `{topic}-{full record name}`.
pub fn subject(topic: &str, full_record_name: &str) -> String {
    format!("{topic}-{full_record_name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_map_to_their_category_topic() {
        assert_eq!(topic_for_stream("order-42"), "eventfold.orders.v1");
        assert_eq!(topic_for_stream("order-a-b"), "eventfold.orders.v1");
        assert_eq!(topic_for_stream("inventory-sku-1"), "eventfold.inventory.v1");
        assert_eq!(topic_for_stream("payment-p1"), "eventfold.payments.v1");
        assert_eq!(topic_for_stream("shipment-s1"), "eventfold.shipping.v1");
        assert_eq!(topic_for_stream("account-a1"), "eventfold.accounts.v1");
        assert_eq!(topic_for_stream("user-u1"), "eventfold.users.v1");
        assert_eq!(topic_for_stream("cart-7"), "eventfold.cart.v1");
        assert_eq!(topic_for_stream("nodash"), "eventfold.nodash.v1");
    }

    #[test]
    fn events_map_to_the_topic_of_their_enum() {
        assert_eq!(topic_for_event("OrderCreated"), Some("eventfold.orders.v1"));
        assert_eq!(topic_for_event("PaymentProcessed"), Some("eventfold.orders.v1"));
        assert_eq!(topic_for_event("PaymentCaptured"), Some("eventfold.payments.v1"));
        assert_eq!(topic_for_event("TransferSent"), Some("eventfold.accounts.v1"));
        assert_eq!(topic_for_event("ShipmentDelivered"), Some("eventfold.shipping.v1"));
        assert_eq!(topic_for_event("Nope"), None);
    }

    #[test]
    fn every_event_type_is_in_one_category_only() {
        let mut seen = std::collections::BTreeSet::new();
        for t in event_types() {
            assert!(seen.insert(t.name), "{} is listed twice", t.name);
            assert_eq!(topic_for_event(t.name), Some(t.topic));
        }
        assert!(seen.len() >= 29, "{seen:?}");
    }

    #[test]
    fn subjects_follow_topic_record_name_strategy() {
        assert_eq!(
            subject("eventfold.orders.v1", "eventfold.orders.v1.OrderCreated"),
            "eventfold.orders.v1-eventfold.orders.v1.OrderCreated"
        );
    }
}
