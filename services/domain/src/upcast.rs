//! Upcasters: pure functions that turn a stored event body of an older
//! schema version into the next version. The store applies them on every
//! read (aggregates, reads, subscriptions) so that code only ever sees
//! current versions; the stored bytes, and with them the hash chain, stay
//! as written.

use serde_json::{Map, Value};

/// Currency of every order written before `OrderCreated` v2 (v1 had none).
pub const LEGACY_ORDER_CURRENCY: &str = "USD";
/// Decimal places of [`LEGACY_ORDER_CURRENCY`].
const LEGACY_DECIMALS: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot upcast {event_type} v{from_version}: {message}")]
pub struct UpcastError {
    pub event_type: &'static str,
    pub from_version: u32,
    pub message: String,
}

/// One step: `event_type` at `from_version` → `from_version + 1`.
#[derive(Debug, Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u32,
    pub apply: fn(Value) -> Result<Value, UpcastError>,
}

/// Every upcaster of the domain.
pub const UPCASTERS: &[Upcaster] =
    &[Upcaster { event_type: "OrderCreated", from_version: 1, apply: order_created_v1_to_v2 }];

/// `OrderCreated` v1 → v2. v1: `{order_id, customer_id, items: [{product_id,
/// quantity, unit_price: "12.50"}], total: "25.00"}`, amounts as decimal
/// strings in the legacy currency. v2: amounts as `{minor, currency}` and a
/// `currency` field.
pub fn order_created_v1_to_v2(data: Value) -> Result<Value, UpcastError> {
    let fail = |message: String| UpcastError { event_type: "OrderCreated", from_version: 1, message };
    let Value::Object(mut body) = data else {
        return Err(fail("the body is not an object".to_owned()));
    };
    let money = |field: &str, value: Option<Value>| -> Result<Value, UpcastError> {
        let text = match value {
            Some(Value::String(s)) => s,
            other => return Err(fail(format!("{field} is {other:?}, not a decimal string"))),
        };
        let minor = decimal_to_minor(&text, LEGACY_DECIMALS).ok_or_else(|| fail(format!("{field} is {text:?}")))?;
        Ok(serde_json::json!({ "minor": minor, "currency": LEGACY_ORDER_CURRENCY }))
    };
    let total = money("total", body.remove("total"))?;
    let Some(Value::Array(items)) = body.remove("items") else {
        return Err(fail("items is not an array".to_owned()));
    };
    let items = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(mut item) = item else {
                return Err(fail(format!("items[{i}] is not an object")));
            };
            let price = money(&format!("items[{i}].unit_price"), item.remove("unit_price"))?;
            item.insert("unit_price".to_owned(), price);
            Ok(Value::Object(item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Map::new();
    out.extend(body);
    out.insert("currency".to_owned(), Value::String(LEGACY_ORDER_CURRENCY.to_owned()));
    out.insert("items".to_owned(), Value::Array(items));
    out.insert("total".to_owned(), total);
    Ok(Value::Object(out))
}

/// `"12.5"` with 2 decimals → 1250. Refuses signs, exponents, more decimals
/// than the currency has, and values out of range.
pub fn decimal_to_minor(text: &str, decimals: u32) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > decimals as usize {
        return None;
    }
    if text.ends_with('.') {
        return None;
    }
    let scale = 10i64.checked_pow(decimals)?;
    let whole: i64 = whole.parse().ok()?;
    let padded = format!("{fraction:0<width$}", width = decimals as usize);
    let fraction: i64 = if padded.is_empty() { 0 } else { padded.parse().ok()? };
    whole.checked_mul(scale)?.checked_add(fraction)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{Aggregate, DomainEvent, order::*};

    #[test]
    fn decimals_become_minor_units() {
        assert_eq!(decimal_to_minor("12.50", 2), Some(1250));
        assert_eq!(decimal_to_minor("12.5", 2), Some(1250));
        assert_eq!(decimal_to_minor("12", 2), Some(1200));
        assert_eq!(decimal_to_minor("0.07", 2), Some(7));
        for bad in ["", "-1", "+1", "1.234", "1e3", "1.", ".5", "1,50", "92233720368547758.08"] {
            assert_eq!(decimal_to_minor(bad, 2), None, "{bad:?}");
        }
    }

    #[test]
    fn order_created_v1_reads_as_v2() {
        let v1 = json!({
            "order_id": "o-1",
            "customer_id": "c-1",
            "items": [{ "product_id": "sku-1", "quantity": 2, "unit_price": "12.50" }],
            "total": "25.00"
        });
        let v2 = order_created_v1_to_v2(v1).unwrap();
        let event = OrderEvent::from_data("OrderCreated", 2, v2).unwrap();
        let usd = |minor| crate::Money::new(minor, LEGACY_ORDER_CURRENCY.parse().unwrap());
        assert_eq!(
            event,
            OrderCreated {
                order_id: "o-1".into(),
                customer_id: "c-1".into(),
                currency: LEGACY_ORDER_CURRENCY.parse().unwrap(),
                items: vec![OrderItem { product_id: "sku-1".into(), quantity: 2, unit_price: usd(1250) }],
                total: usd(2500),
                payment_token: None,
                carrier: None,
            }
            .into()
        );
        let order = Order::default().evolve(&event);
        assert_eq!(order.status, OrderStatus::Created);
        assert_eq!(order.total, Some(usd(2500)));
    }

    #[test]
    fn malformed_v1_bodies_are_errors_not_guesses() {
        for bad in [
            json!([]),
            json!({ "order_id": "o", "items": [], "total": 25 }),
            json!({ "order_id": "o", "items": {}, "total": "1" }),
            json!({ "order_id": "o", "items": [{ "unit_price": "1.001" }], "total": "1" }),
        ] {
            assert!(order_created_v1_to_v2(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_v1_body_is_not_decoded_as_v2_without_upcasting() {
        let v1 = json!({ "order_id": "o-1", "customer_id": "c", "items": [], "total": "1" });
        assert!(matches!(
            OrderEvent::from_data("OrderCreated", 1, v1),
            Err(crate::DecodeError::Version { found: 1, current: 2, .. })
        ));
    }

    #[test]
    fn every_upcaster_ends_at_the_current_version() {
        for u in UPCASTERS {
            let current = OrderEvent::current_version(u.event_type).expect("an upcaster of a known type");
            assert!(u.from_version < current, "{} v{} is not older than v{current}", u.event_type, u.from_version);
        }
    }
}
