//! Orders as the tests send them through the command bus.

use eventfold_domain::{
    Currency,
    order::{CreateOrder, OrderItem},
};

/// Euros.
pub fn eur() -> Currency {
    "EUR".parse().expect("EUR is a currency")
}

/// An order of `items` in euros, with neither a payment token nor a
/// carrier.
pub fn created(order_id: &str, customer_id: &str, items: Vec<OrderItem>) -> CreateOrder {
    CreateOrder {
        order_id: order_id.to_owned(),
        customer_id: customer_id.to_owned(),
        currency: eur(),
        items,
        payment_token: None,
        carrier: None,
    }
}
