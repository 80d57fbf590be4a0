"""The order flow from Python over gRPC, with the stubs grpcio-tools
generated from proto/ (tests/clients/generate python).

    tests/clients/example python [HOST:PORT]      (default 127.0.0.1:50051)

Needs the read side (eventfold dev with PostgreSQL). Every answer is
checked; the first surprise ends the run with exit status 1.
"""

import sys
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from eventfold.common.v1 import common_pb2
from eventfold.eventstore.v1 import eventstore_pb2, eventstore_pb2_grpc
from eventfold.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from eventfold.orders.v1 import orders_pb2, orders_pb2_grpc
from eventfold.query.v1 import query_pb2, query_pb2_grpc
from eventfold.sagas.v1 import sagas_pb2, sagas_pb2_grpc

# Every call gets a deadline; watching a saga gets longer.
TIMEOUT = 10
SAGA_TIMEOUT = 60


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")


def create_order(orders, order_id, product_id, token):
    """CreateOrder for two kettles at 12.50 EUR, paid with `token`."""
    request = orders_pb2.CreateOrderRequest(
        request_id=f"create-{order_id}",
        order_id=order_id,
        customer_id="c-python",
        currency="EUR",
        payment_token=token,
        carrier="DHL",
        items=[
            orders_pb2.OrderItem(
                product_id=product_id,
                quantity=2,
                unit_price=common_pb2.Money(minor=1250, currency="EUR"),
            )
        ],
    )
    return request, orders.CreateOrder(request, timeout=TIMEOUT)


def watch_saga(sagas, saga_id):
    """Follows WatchSaga to its end; the saga's last state.

    The saga starts a moment after its order: until then WatchSaga answers
    NOT_FOUND, so that answer is retried.
    """
    deadline = time.monotonic() + SAGA_TIMEOUT
    while True:
        last = None
        try:
            stream = sagas.WatchSaga(
                sagas_pb2.WatchSagaRequest(saga_id=saga_id),
                timeout=max(deadline - time.monotonic(), 0.1),
            )
            for message in stream:
                last = message.saga
                step = f" at {last.current_step}" if last.current_step else ""
                print(f"  saga {saga_id}: {sagas_pb2.SagaStatus.Name(last.status)}{step}")
            check(last is not None, f"WatchSaga({saga_id}) sent nothing")
            return last
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def refused(call, request):
    """Makes a call that must be refused; its code and status details."""
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)
        check(status is not None, "the refusal carries google.rpc.Status details")
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Is(info.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(bad_request.DESCRIPTOR):
                detail.Unpack(bad_request)
        return error.code(), info, bad_request
    sys.exit(f"FAILED: {request} was accepted")


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    run = uuid.uuid4().hex[:8]
    product_id, paid, declined = f"kettle-{run}", f"py-{run}", f"py-{run}-declined"

    with grpc.insecure_channel(target) as channel:
        inventory = inventory_pb2_grpc.InventoryCommandServiceStub(channel)
        orders = orders_pb2_grpc.OrderCommandServiceStub(channel)
        sagas = sagas_pb2_grpc.SagaServiceStub(channel)
        queries = query_pb2_grpc.OrderQueryServiceStub(channel)
        store = eventstore_pb2_grpc.EventStoreServiceStub(channel)

        # 1. A product and its stock.
        inventory.RegisterProduct(
            inventory_pb2.RegisterProductRequest(product_id=product_id, name="Kettle"), timeout=TIMEOUT
        )
        inventory.ReplenishStock(
            inventory_pb2.ReplenishStockRequest(product_id=product_id, quantity=10), timeout=TIMEOUT
        )
        print(f"product {product_id}: registered, 10 in stock")

        # 2. An order with a payment token and a request id; its total is
        # computed by the server.
        request, created = create_order(orders, paid, product_id, "tok_visa")
        print(f"order {paid}: total {created.total.minor} {created.total.currency}, "
              f"global position {created.result.global_position}")
        check(created.total == common_pb2.Money(minor=2500, currency="EUR"), f"total {created.total}")
        check(created.result.global_position > 0, "the write's position")

        # 3. The same request again (a retry after a lost answer): the first
        # answer, nothing appended twice.
        retried = orders.CreateOrder(request, timeout=TIMEOUT)
        check(retried == created, f"retry answered {retried}, first {created}")
        print("retry with the same request id: the identical answer")

        # 4. The fulfilment saga, watched to its end.
        saga = watch_saga(sagas, f"fulfil-{paid}")
        check(saga.status == sagas_pb2.SAGA_STATUS_COMPLETED, f"saga {saga}")
        print(f"saga fulfil-{paid}: {sagas_pb2.SagaStatus.Name(saga.status)}")

        # 5. Read your write: the read model waits for the command's position.
        view = queries.GetOrder(
            query_pb2.GetOrderRequest(order_id=paid, min_position=created.result.global_position),
            timeout=TIMEOUT,
        ).order
        check(view.order_id == paid and view.total.minor == 2500, f"read model {view}")
        check(view.last_position >= created.result.global_position, f"read model behind: {view}")
        print(f"read model (min_position {created.result.global_position}): "
              f"{query_pb2.OrderStatus.Name(view.status)}, total {view.total.minor} {view.total.currency}")

        # 6. The order's events, as the event store keeps them.
        events = store.ReadStream(
            eventstore_pb2.ReadStreamRequest(stream_id=f"order-{paid}"), timeout=TIMEOUT
        ).events
        types = [event.event_type for event in events]
        check(types[:1] == ["OrderCreated"] and len(types) > 1, f"order stream {types}")
        print(f"order stream order-{paid}: {', '.join(types)}")

        # 7. A declined card: the saga fails and says why.
        create_order(orders, declined, product_id, "tok_decline")
        saga = watch_saga(sagas, f"fulfil-{declined}")
        check(saga.status == sagas_pb2.SAGA_STATUS_FAILED and saga.reason == "PAYMENT_DECLINED", f"saga {saga}")
        print(f"saga fulfil-{declined}: {sagas_pb2.SagaStatus.Name(saga.status)} ({saga.reason})")

        # 8. A refused command: the code, the ErrorInfo reason and the
        # BadRequest field that says what to fix.
        bad = orders_pb2.CreateOrderRequest(
            order_id=f"py-{run}-empty", customer_id="c-python", currency="EUR",
            items=[orders_pb2.OrderItem(product_id=product_id, quantity=0,
                                        unit_price=common_pb2.Money(minor=1250, currency="EUR"))],
        )
        code, info, bad_request = refused(orders.CreateOrder, bad)
        fields = [violation.field for violation in bad_request.field_violations]
        check(code == grpc.StatusCode.INVALID_ARGUMENT, f"code {code}")
        check(info.reason == "INVALID_ARGUMENT", f"reason {info.reason}")
        check(fields == ["items[0].quantity"], f"fields {fields}")
        print(f"refused: {code.name}, reason {info.reason}, field {fields[0]} "
              f"({bad_request.field_violations[0].description})")

    print("python example: every check passed")


if __name__ == "__main__":
    main()
