//! Property tests: random command sequences never break an aggregate's
//! invariants, and replaying what `decide` produced through `evolve`
//! (after a trip through JSON) reproduces the state.

use eventfold_domain::{Aggregate, Currency, DomainEvent, Money, account::*, inventory::*, order::*, payment::*};
use proptest::prelude::*;

fn usd() -> Currency {
    "USD".parse().unwrap()
}

/// Runs `commands` from the empty state, keeping what was accepted; checks
/// `invariant` after every step and the replay at the end.
fn run<A: Aggregate + PartialEq>(
    commands: impl IntoIterator<Item = A::Command>,
    invariant: impl Fn(&A, &[A::Event]),
) -> (A, Vec<A::Event>) {
    let mut state = A::default();
    let mut history: Vec<A::Event> = Vec::new();
    for command in commands {
        if let Ok(events) = state.decide(&command) {
            state = state.fold(&events);
            history.extend(events);
        }
        invariant(&state, &history);
    }
    let replayed = A::default().fold(
        &history
            .iter()
            .map(|e| A::Event::from_data(e.event_type(), e.schema_version(), e.to_data()).expect("decodes"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(replayed, state, "replay of the accepted events reproduces the state");
    (state, history)
}

fn inventory_command() -> impl Strategy<Value = InventoryCommand> {
    let order = (0..6u8).prop_map(|o| format!("o-{o}"));
    prop_oneof![
        (1..20u32).prop_map(|quantity| ReplenishStock { quantity }.into()),
        (order.clone(), 0..15u32).prop_map(|(order_id, quantity)| ReserveStock { order_id, quantity }.into()),
        order.clone().prop_map(|order_id| ReleaseReservation { order_id, reason: "r".into() }.into()),
        order.prop_map(|order_id| ConsumeReservation { order_id }.into()),
    ]
}

proptest! {
    #[test]
    fn inventory_never_oversells_and_closes_reservations_once(
        commands in proptest::collection::vec(inventory_command(), 0..60)
    ) {
        let register = RegisterProduct { product_id: "sku".into(), name: "Widget".into() }.into();
        run::<Inventory>(std::iter::once(register).chain(commands), |state, history| {
            let replenished: u64 = history.iter().map(|e| match e {
                InventoryEvent::Replenished(r) => u64::from(r.quantity),
                _ => 0,
            }).sum();
            assert_eq!(state.on_hand() + state.consumed, replenished, "stock = available + reserved + shipped");
            for order in state.reservations.keys() {
                assert!(!state.closed.contains(order), "{order} is both open and closed");
            }
            for o in 0..6 {
                let order = format!("o-{o}");
                let count = |f: fn(&InventoryEvent, &str) -> bool| history.iter().filter(|e| f(e, &order)).count();
                let reserved = count(|e, o| matches!(e, InventoryEvent::Reserved(r) if r.order_id == o));
                let closed = count(|e, o| matches!(e, InventoryEvent::Released(r) if r.order_id == o))
                    + count(|e, o| matches!(e, InventoryEvent::Consumed(r) if r.order_id == o));
                assert!(reserved <= 1 && closed <= reserved, "{order}: {reserved} reservations, {closed} closings");
            }
        });
    }
}

fn order_command(total: i64) -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        Just(ConfirmOrder.into()),
        prop_oneof![Just(total), 1..total + 2].prop_map(|minor| ProcessPayment {
            payment_id: "p".into(),
            amount: Money::new(minor, usd())
        }
        .into()),
        Just(ShipOrder { carrier: "DHL".into(), tracking_number: "T".into() }.into()),
        Just(CancelOrder { reason: "r".into() }.into()),
    ]
}

fn items() -> impl Strategy<Value = Vec<OrderItem>> {
    proptest::collection::vec(
        (0..5u8, 0..4u32, -1..5000i64).prop_map(|(p, quantity, minor)| OrderItem {
            product_id: format!("sku-{p}"),
            quantity,
            unit_price: Money::new(minor, usd()),
        }),
        0..5,
    )
}

proptest! {
    #[test]
    fn orders_follow_their_state_machine(
        (items, commands) in items().prop_flat_map(|items| {
            // Payments of the right total are generated as often as wrong ones.
            let total = items.iter().map(|i| i.unit_price.minor * i64::from(i.quantity)).sum::<i64>().max(1);
            (Just(items), proptest::collection::vec(order_command(total), 0..12))
        }),
    ) {
        let create = CreateOrder { order_id: "o".into(), customer_id: "c".into(), currency: usd(), items: items.clone(), payment_token: None, carrier: None };
        let (state, history) = run::<Order>(std::iter::once(create.into()).chain(commands), |state, history| {
            if let Some(OrderEvent::Created(created)) = history.first() {
                let sum: i64 = created.items.iter().map(|i| i.unit_price.minor * i64::from(i.quantity)).sum();
                assert_eq!(created.total.minor, sum, "total computed from the items");
                assert!(!created.items.is_empty() && created.items.iter().all(|i| i.quantity > 0));
                assert!(created.items.iter().all(|i| i.unit_price.currency == created.currency));
            } else {
                assert!(history.is_empty() && state.status == OrderStatus::New);
            }
        });
        // The accepted transitions form a path of the state machine.
        let mut status = OrderStatus::New;
        for event in &history {
            let next = match event {
                OrderEvent::Created(_) => OrderStatus::Created,
                OrderEvent::Confirmed(_) => OrderStatus::Confirmed,
                OrderEvent::PaymentProcessed(p) => {
                    assert_eq!(Some(p.amount), state.total, "paid exactly the total");
                    OrderStatus::Paid
                }
                OrderEvent::Shipped(_) => OrderStatus::Shipped,
                OrderEvent::Cancelled(_) => OrderStatus::Cancelled,
            };
            let allowed = matches!(
                (status, next),
                (OrderStatus::New, OrderStatus::Created)
                    | (OrderStatus::Created, OrderStatus::Confirmed)
                    | (OrderStatus::Confirmed, OrderStatus::Paid)
                    | (OrderStatus::Paid, OrderStatus::Shipped)
                    | (OrderStatus::Created | OrderStatus::Confirmed | OrderStatus::Paid, OrderStatus::Cancelled)
            );
            assert!(allowed, "{status:?} → {next:?}");
            status = next;
        }
        assert_eq!(status, state.status);
    }
}

fn payment_command() -> impl Strategy<Value = PaymentCommand> {
    let amount = (1..700i64).prop_map(|m| Money::new(m, usd()));
    prop_oneof![
        amount.clone().prop_map(|amount| CapturePayment { amount }.into()),
        amount.prop_map(|amount| RefundPayment { amount, reason: "r".into() }.into()),
        Just(VoidPayment { reason: "r".into() }.into()),
    ]
}

proptest! {
    #[test]
    fn payments_never_exceed_their_bounds(
        authorize in 1..1500i64,
        commands in proptest::collection::vec(payment_command(), 0..20),
    ) {
        let total = Money::new(1000, usd());
        let first = AuthorizePayment {
            payment_id: "p".into(),
            order_id: "o".into(),
            amount: Money::new(authorize, usd()),
            order_total: total,
            provider_reference: "ref".into(),
        };
        run::<Payment>(std::iter::once(first.into()).chain(commands), |state, history| {
            let authorized = state.authorized.map_or(0, |m| m.minor);
            assert!(authorized <= total.minor, "authorized {authorized} > order total");
            assert!(state.captured <= authorized, "captured {} > authorized {authorized}", state.captured);
            assert!(state.refunded <= state.captured, "refunded {} > captured {}", state.refunded, state.captured);
            if let Some(void) = history.iter().position(|e| matches!(e, PaymentEvent::Voided(_))) {
                assert!(!history[..void].iter().any(|e| matches!(e, PaymentEvent::Captured(_))), "voided after capture");
                assert!(!history[void..].iter().any(|e| matches!(e, PaymentEvent::Captured(_))), "captured after void");
            }
        });
    }
}

fn account_command() -> impl Strategy<Value = AccountCommand> {
    let amount = (1..500i64).prop_map(|m| Money::new(m, usd()));
    let id = (0..8u8).prop_map(|i| format!("x-{i}"));
    prop_oneof![
        (id.clone(), amount.clone())
            .prop_map(|(transaction_id, amount)| DepositMoney { transaction_id, amount }.into()),
        (id.clone(), amount.clone())
            .prop_map(|(transaction_id, amount)| WithdrawMoney { transaction_id, amount }.into()),
        (id.clone(), amount.clone()).prop_map(|(transfer_id, amount)| SendTransfer {
            transfer_id,
            to_account_id: "b".into(),
            amount
        }
        .into()),
        (id.clone(), amount).prop_map(|(transfer_id, amount)| ReceiveTransfer {
            transfer_id,
            from_account_id: "b".into(),
            amount
        }
        .into()),
        id.prop_map(|transfer_id| RefundTransfer { transfer_id, reason: "r".into() }.into()),
        Just(CloseAccount.into()),
    ]
}

proptest! {
    #[test]
    fn accounts_are_never_overdrawn_and_balance_is_the_sum_of_movements(
        commands in proptest::collection::vec(account_command(), 0..40)
    ) {
        let open = OpenAccount { account_id: "a".into(), owner_id: "u".into(), currency: usd() }.into();
        run::<Account>(std::iter::once(open).chain(commands), |state, history| {
            let sum: i64 = history.iter().map(|e| match e {
                AccountEvent::Deposited(d) => d.amount.minor,
                AccountEvent::TransferReceived(d) => d.amount.minor,
                AccountEvent::TransferRefunded(d) => d.amount.minor,
                AccountEvent::Withdrawn(w) => -w.amount.minor,
                AccountEvent::TransferSent(w) => -w.amount.minor,
                AccountEvent::Opened(_) | AccountEvent::Closed(_) | AccountEvent::TransferRequested(_) => 0,
            }).sum();
            let balance = state.balance.map_or(0, |b| b.minor);
            assert!(balance >= 0, "overdrawn: {balance}");
            assert_eq!(balance, sum, "balance is the sum of the movements");
            let refunds = history.iter().filter(|e| matches!(e, AccountEvent::TransferRefunded(_))).count();
            let distinct: std::collections::BTreeSet<_> = history.iter().filter_map(|e| match e {
                AccountEvent::TransferRefunded(r) => Some(r.transfer_id.clone()),
                _ => None,
            }).collect();
            assert_eq!(refunds, distinct.len(), "a transfer is refunded at most once");
        });
    }
}
