//! The command services at the gRPC edge: proto requests become domain
//! commands in an [`Envelope`] (request id, principal, correlation and
//! causation ids from the metadata), the bus runs them, and its answer
//! becomes the proto answer, its error an AIP-193 status (`From<Error> for
//! Status`, in `error.rs`). The only place of this crate that sees proto
//! types.

use eventfold_domain::{
    Currency, Money,
    account::{self as account, AccountCommand},
    inventory::{self as inventory, InventoryCommand},
    order::{self as order, OrderCommand},
    payment::{self as payment, PaymentCommand},
    shipment::{self as shipment, ShipmentCommand},
    user::{self as user, UserCommand},
};
use eventfold_platform::status::invalid_argument;
use eventfold_proto::{
    accounts::{self as accounts_pb, account_command_service_server::AccountCommandService},
    common as common_pb,
    inventory::{self as inventory_pb, inventory_command_service_server::InventoryCommandService},
    orders::{self as orders_pb, order_command_service_server::OrderCommandService},
    payments::{self as payments_pb, payment_command_service_server::PaymentCommandService},
    shipping::{self as shipping_pb, shipping_command_service_server::ShippingCommandService},
    users::{self as users_pb, user_command_service_server::UserCommandService},
};
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use uuid::Uuid;

use crate::{
    bus::Bus,
    envelope::{Command, Envelope, Meta, Reply, Write},
};

/// Metadata key of the authenticated caller, set by the gateway (or a
/// trusted proxy) after it authenticated the request.
pub const PRINCIPAL_HEADER: &str = "x-eventfold-principal";
/// Metadata key of the correlation id (a fresh one when absent).
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// Metadata key of the causation id.
pub const CAUSATION_HEADER: &str = "x-causation-id";

/// ISO 4217 `XXX` (no currency): what stands in for a currency that a
/// request got wrong or left out, in a request that [`Edge::finish`] then
/// refuses.
fn no_currency() -> Currency {
    // why: "XXX" is three ASCII capital letters, which `Currency::from_str`
    // always accepts, and the domain crate offers no way to build a
    // `Currency` without parsing.
    #[allow(clippy::expect_used)]
    let xxx = "XXX".parse().expect("XXX is three capital letters");
    xxx
}

/// Conversion problems of one request, reported together.
#[derive(Default)]
struct Edge {
    violations: Vec<(String, String)>,
}

impl Edge {
    fn currency(&mut self, field: &str, code: &str) -> Currency {
        code.parse().unwrap_or_else(|_| {
            self.violations.push((field.to_owned(), format!("must be an ISO 4217 code like EUR, got {code:?}")));
            no_currency()
        })
    }

    fn money(&mut self, field: &str, money: Option<common_pb::Money>) -> Money {
        match money {
            Some(m) => Money::new(m.minor, self.currency(&format!("{field}.currency"), &m.currency)),
            None => {
                self.violations.push((field.to_owned(), "is required".to_owned()));
                Money::new(0, no_currency())
            }
        }
    }

    /// An id the command is not addressed by (the bus checks that one), so
    /// that its violation names the request's own field.
    fn id(&mut self, field: &str, value: &str) {
        let mut found = Vec::new();
        eventfold_domain::check_id(field, value, &mut found);
        self.violations.extend(found.into_iter().map(|v| (v.field, v.description)));
    }

    fn finish(self) -> Result<(), Status> {
        if self.violations.is_empty() { Ok(()) } else { Err(invalid_argument(self.violations)) }
    }
}

fn meta<T>(request: &Request<T>, request_id: &str) -> Meta {
    let header = |name: &str| {
        request.metadata().get(name).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_owned)
    };
    Meta {
        request_id: (!request_id.is_empty()).then(|| request_id.to_owned()),
        principal: header(PRINCIPAL_HEADER),
        correlation_id: header(CORRELATION_HEADER).unwrap_or_else(|| Uuid::now_v7().to_string()),
        causation_id: header(CAUSATION_HEADER),
    }
}

async fn send(bus: &Bus, meta: Meta, command: Command) -> Result<Reply, Status> {
    bus.clone().oneshot(Envelope::new(command, meta)).await.map_err(Status::from)
}

fn result(write: &Write) -> Option<common_pb::WriteResult> {
    Some(common_pb::WriteResult {
        stream_id: write.stream_id.clone(),
        stream_version: write.stream_version.unwrap_or_default(),
        global_position: write.global_position,
    })
}

/// A money field of an appended event, as proto.
fn event_money(reply: &Reply, event_type: &str, field: &str) -> Option<common_pb::Money> {
    let money: Money = serde_json::from_value(reply.event(event_type)?.get(field)?.clone()).ok()?;
    Some(common_pb::Money { minor: money.minor, currency: money.currency.to_string() })
}

/// Declares a command service struct over the bus.
macro_rules! service {
    ($($name:ident),*) => {
        $(
            #[derive(Clone)]
            pub struct $name {
                bus: Bus,
            }

            impl $name {
                pub fn new(bus: Bus) -> Self {
                    Self { bus }
                }
            }
        )*
    };
}

service!(OrderCommands, InventoryCommands, PaymentCommands, ShippingCommands, AccountCommands, UserCommands);

#[tonic::async_trait]
impl OrderCommandService for OrderCommands {
    async fn create_order(
        &self,
        request: Request<orders_pb::CreateOrderRequest>,
    ) -> Result<Response<orders_pb::CreateOrderResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let currency = edge.currency("currency", &r.currency);
        let items = r
            .items
            .into_iter()
            .enumerate()
            .map(|(i, item)| order::OrderItem {
                product_id: item.product_id,
                quantity: item.quantity,
                unit_price: edge.money(&format!("items[{i}].unit_price"), item.unit_price),
            })
            .collect();
        edge.finish()?;
        let given = |text: String| (!text.is_empty()).then_some(text);
        let create = order::CreateOrder {
            order_id: r.order_id.clone(),
            customer_id: r.customer_id,
            currency,
            items,
            payment_token: given(r.payment_token).map(Into::into),
            carrier: given(r.carrier),
        };
        let reply = send(&self.bus, meta, Command::Order { order_id: r.order_id, command: create.into() }).await?;
        Ok(Response::new(orders_pb::CreateOrderResponse {
            result: result(reply.first()),
            total: event_money(&reply, "OrderCreated", "total"),
        }))
    }

    async fn confirm_order(
        &self,
        request: Request<orders_pb::ConfirmOrderRequest>,
    ) -> Result<Response<orders_pb::ConfirmOrderResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let command = Command::Order { order_id: r.order_id, command: OrderCommand::Confirm(order::ConfirmOrder) };
        let reply = send(&self.bus, meta, command).await?;
        Ok(Response::new(orders_pb::ConfirmOrderResponse { result: result(reply.first()) }))
    }

    async fn process_payment(
        &self,
        request: Request<orders_pb::ProcessPaymentRequest>,
    ) -> Result<Response<orders_pb::ProcessPaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let pay = order::ProcessPayment { payment_id: r.payment_id, amount };
        let reply = send(&self.bus, meta, Command::Order { order_id: r.order_id, command: pay.into() }).await?;
        Ok(Response::new(orders_pb::ProcessPaymentResponse { result: result(reply.first()) }))
    }

    async fn ship_order(
        &self,
        request: Request<orders_pb::ShipOrderRequest>,
    ) -> Result<Response<orders_pb::ShipOrderResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let ship = order::ShipOrder { carrier: r.carrier, tracking_number: r.tracking_number };
        let reply = send(&self.bus, meta, Command::Order { order_id: r.order_id, command: ship.into() }).await?;
        Ok(Response::new(orders_pb::ShipOrderResponse { result: result(reply.first()) }))
    }

    async fn cancel_order(
        &self,
        request: Request<orders_pb::CancelOrderRequest>,
    ) -> Result<Response<orders_pb::CancelOrderResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let cancel = order::CancelOrder { reason: r.reason };
        let reply = send(&self.bus, meta, Command::Order { order_id: r.order_id, command: cancel.into() }).await?;
        Ok(Response::new(orders_pb::CancelOrderResponse { result: result(reply.first()) }))
    }
}

/// An inventory command for `product_id`.
async fn product(
    bus: &Bus,
    meta: Meta,
    product_id: String,
    command: InventoryCommand,
) -> Result<Option<common_pb::WriteResult>, Status> {
    let reply = send(bus, meta, Command::Inventory { product_id, command }).await?;
    Ok(result(reply.first()))
}

#[tonic::async_trait]
impl InventoryCommandService for InventoryCommands {
    async fn register_product(
        &self,
        request: Request<inventory_pb::RegisterProductRequest>,
    ) -> Result<Response<inventory_pb::RegisterProductResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let register = inventory::RegisterProduct { product_id: r.product_id.clone(), name: r.name };
        let result = product(&self.bus, meta, r.product_id, register.into()).await?;
        Ok(Response::new(inventory_pb::RegisterProductResponse { result }))
    }

    async fn replenish_stock(
        &self,
        request: Request<inventory_pb::ReplenishStockRequest>,
    ) -> Result<Response<inventory_pb::ReplenishStockResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let command = inventory::ReplenishStock { quantity: r.quantity }.into();
        let result = product(&self.bus, meta, r.product_id, command).await?;
        Ok(Response::new(inventory_pb::ReplenishStockResponse { result }))
    }

    async fn reserve_stock(
        &self,
        request: Request<inventory_pb::ReserveStockRequest>,
    ) -> Result<Response<inventory_pb::ReserveStockResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let command = inventory::ReserveStock { order_id: r.order_id, quantity: r.quantity }.into();
        let result = product(&self.bus, meta, r.product_id, command).await?;
        Ok(Response::new(inventory_pb::ReserveStockResponse { result }))
    }

    async fn release_reservation(
        &self,
        request: Request<inventory_pb::ReleaseReservationRequest>,
    ) -> Result<Response<inventory_pb::ReleaseReservationResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let command = inventory::ReleaseReservation { order_id: r.order_id, reason: r.reason }.into();
        let result = product(&self.bus, meta, r.product_id, command).await?;
        Ok(Response::new(inventory_pb::ReleaseReservationResponse { result }))
    }

    async fn consume_reservation(
        &self,
        request: Request<inventory_pb::ConsumeReservationRequest>,
    ) -> Result<Response<inventory_pb::ConsumeReservationResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let command = inventory::ConsumeReservation { order_id: r.order_id }.into();
        let result = product(&self.bus, meta, r.product_id, command).await?;
        Ok(Response::new(inventory_pb::ConsumeReservationResponse { result }))
    }
}

/// A payment command for `payment_id`.
async fn payment(
    bus: &Bus,
    meta: Meta,
    payment_id: String,
    command: PaymentCommand,
) -> Result<Option<common_pb::WriteResult>, Status> {
    let reply = send(bus, meta, Command::Payment { payment_id, command }).await?;
    Ok(result(reply.first()))
}

#[tonic::async_trait]
impl PaymentCommandService for PaymentCommands {
    async fn authorize_payment(
        &self,
        request: Request<payments_pb::AuthorizePaymentRequest>,
    ) -> Result<Response<payments_pb::AuthorizePaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let command = Command::AuthorizePayment {
            payment_id: r.payment_id,
            order_id: r.order_id,
            amount,
            provider_reference: r.provider_reference,
        };
        let reply = send(&self.bus, meta, command).await?;
        Ok(Response::new(payments_pb::AuthorizePaymentResponse { result: result(reply.first()) }))
    }

    async fn decline_payment(
        &self,
        request: Request<payments_pb::DeclinePaymentRequest>,
    ) -> Result<Response<payments_pb::DeclinePaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let decline = payment::DeclinePayment {
            payment_id: r.payment_id.clone(),
            order_id: r.order_id,
            amount,
            reason: r.reason,
        };
        let result = payment(&self.bus, meta, r.payment_id, decline.into()).await?;
        Ok(Response::new(payments_pb::DeclinePaymentResponse { result }))
    }

    async fn capture_payment(
        &self,
        request: Request<payments_pb::CapturePaymentRequest>,
    ) -> Result<Response<payments_pb::CapturePaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let result = payment(&self.bus, meta, r.payment_id, payment::CapturePayment { amount }.into()).await?;
        Ok(Response::new(payments_pb::CapturePaymentResponse { result }))
    }

    async fn refund_payment(
        &self,
        request: Request<payments_pb::RefundPaymentRequest>,
    ) -> Result<Response<payments_pb::RefundPaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let refund = payment::RefundPayment { amount, reason: r.reason };
        let result = payment(&self.bus, meta, r.payment_id, refund.into()).await?;
        Ok(Response::new(payments_pb::RefundPaymentResponse { result }))
    }

    async fn void_payment(
        &self,
        request: Request<payments_pb::VoidPaymentRequest>,
    ) -> Result<Response<payments_pb::VoidPaymentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let result = payment(&self.bus, meta, r.payment_id, payment::VoidPayment { reason: r.reason }.into()).await?;
        Ok(Response::new(payments_pb::VoidPaymentResponse { result }))
    }
}

/// A shipment command for `shipment_id`.
async fn shipment(
    bus: &Bus,
    meta: Meta,
    shipment_id: String,
    command: ShipmentCommand,
) -> Result<Option<common_pb::WriteResult>, Status> {
    let reply = send(bus, meta, Command::Shipment { shipment_id, command }).await?;
    Ok(result(reply.first()))
}

#[tonic::async_trait]
impl ShippingCommandService for ShippingCommands {
    async fn create_shipment(
        &self,
        request: Request<shipping_pb::CreateShipmentRequest>,
    ) -> Result<Response<shipping_pb::CreateShipmentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let create = shipment::CreateShipment {
            shipment_id: r.shipment_id.clone(),
            order_id: r.order_id,
            carrier: r.carrier,
            tracking_number: r.tracking_number,
        };
        let result = shipment(&self.bus, meta, r.shipment_id, create.into()).await?;
        Ok(Response::new(shipping_pb::CreateShipmentResponse { result }))
    }

    async fn dispatch_shipment(
        &self,
        request: Request<shipping_pb::DispatchShipmentRequest>,
    ) -> Result<Response<shipping_pb::DispatchShipmentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let result = shipment(&self.bus, meta, r.shipment_id, shipment::DispatchShipment.into()).await?;
        Ok(Response::new(shipping_pb::DispatchShipmentResponse { result }))
    }

    async fn deliver_shipment(
        &self,
        request: Request<shipping_pb::DeliverShipmentRequest>,
    ) -> Result<Response<shipping_pb::DeliverShipmentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let result = shipment(&self.bus, meta, r.shipment_id, shipment::DeliverShipment.into()).await?;
        Ok(Response::new(shipping_pb::DeliverShipmentResponse { result }))
    }

    async fn cancel_shipment(
        &self,
        request: Request<shipping_pb::CancelShipmentRequest>,
    ) -> Result<Response<shipping_pb::CancelShipmentResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let cancel = shipment::CancelShipment { reason: r.reason };
        let result = shipment(&self.bus, meta, r.shipment_id, cancel.into()).await?;
        Ok(Response::new(shipping_pb::CancelShipmentResponse { result }))
    }
}

/// An account command for `account_id`.
async fn account(bus: &Bus, meta: Meta, account_id: String, command: AccountCommand) -> Result<Reply, Status> {
    send(bus, meta, Command::Account { account_id, command }).await
}

#[tonic::async_trait]
impl AccountCommandService for AccountCommands {
    async fn open_account(
        &self,
        request: Request<accounts_pb::OpenAccountRequest>,
    ) -> Result<Response<accounts_pb::OpenAccountResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let currency = edge.currency("currency", &r.currency);
        edge.finish()?;
        let open = account::OpenAccount { account_id: r.account_id.clone(), owner_id: r.owner_id, currency };
        let reply = account(&self.bus, meta, r.account_id, open.into()).await?;
        Ok(Response::new(accounts_pb::OpenAccountResponse { result: result(reply.first()) }))
    }

    async fn deposit_money(
        &self,
        request: Request<accounts_pb::DepositMoneyRequest>,
    ) -> Result<Response<accounts_pb::DepositMoneyResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let deposit = account::DepositMoney { transaction_id: r.transaction_id, amount };
        let reply = account(&self.bus, meta, r.account_id, deposit.into()).await?;
        Ok(Response::new(accounts_pb::DepositMoneyResponse {
            result: result(reply.first()),
            balance: event_money(&reply, "MoneyDeposited", "balance"),
        }))
    }

    async fn withdraw_money(
        &self,
        request: Request<accounts_pb::WithdrawMoneyRequest>,
    ) -> Result<Response<accounts_pb::WithdrawMoneyResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let withdraw = account::WithdrawMoney { transaction_id: r.transaction_id, amount };
        let reply = account(&self.bus, meta, r.account_id, withdraw.into()).await?;
        Ok(Response::new(accounts_pb::WithdrawMoneyResponse {
            result: result(reply.first()),
            balance: event_money(&reply, "MoneyWithdrawn", "balance"),
        }))
    }

    async fn request_transfer(
        &self,
        request: Request<accounts_pb::RequestTransferRequest>,
    ) -> Result<Response<accounts_pb::RequestTransferResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let mut edge = Edge::default();
        // The source account is the stream the command goes to: checked
        // here under its own name, not the bus's `account_id`.
        edge.id("from_account_id", &r.from_account_id);
        let amount = edge.money("amount", r.amount);
        edge.finish()?;
        let saga_id = eventfold_domain::saga::transfer_saga_id(&r.transfer_id);
        let command =
            account::RequestTransfer { transfer_id: r.transfer_id, to_account_id: r.to_account_id, amount }.into();
        let reply = account(&self.bus, meta, r.from_account_id, command).await?;
        Ok(Response::new(accounts_pb::RequestTransferResponse { result: result(reply.first()), saga_id }))
    }

    async fn close_account(
        &self,
        request: Request<accounts_pb::CloseAccountRequest>,
    ) -> Result<Response<accounts_pb::CloseAccountResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let reply = account(&self.bus, meta, r.account_id, account::CloseAccount.into()).await?;
        Ok(Response::new(accounts_pb::CloseAccountResponse { result: result(reply.first()) }))
    }
}

/// A user command for `user_id`.
async fn user(
    bus: &Bus,
    meta: Meta,
    user_id: String,
    command: UserCommand,
) -> Result<Option<common_pb::WriteResult>, Status> {
    let reply = send(bus, meta, Command::User { user_id, command }).await?;
    Ok(result(reply.first()))
}

#[tonic::async_trait]
impl UserCommandService for UserCommands {
    async fn register_user(
        &self,
        request: Request<users_pb::RegisterUserRequest>,
    ) -> Result<Response<users_pb::RegisterUserResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let register =
            user::RegisterUser { user_id: r.user_id.clone(), email: r.email.into(), display_name: r.display_name };
        let result = user(&self.bus, meta, r.user_id, register.into()).await?;
        Ok(Response::new(users_pb::RegisterUserResponse { result }))
    }

    async fn record_login(
        &self,
        request: Request<users_pb::RecordLoginRequest>,
    ) -> Result<Response<users_pb::RecordLoginResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let result = user(&self.bus, meta, r.user_id, user::RecordLogin { source: r.source }.into()).await?;
        Ok(Response::new(users_pb::RecordLoginResponse { result }))
    }

    async fn record_user_action(
        &self,
        request: Request<users_pb::RecordUserActionRequest>,
    ) -> Result<Response<users_pb::RecordUserActionResponse>, Status> {
        let meta = meta(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let action = user::RecordAction { action: r.action, subject: r.subject };
        let result = user(&self.bus, meta, r.user_id, action.into()).await?;
        Ok(Response::new(users_pb::RecordUserActionResponse { result }))
    }
}
