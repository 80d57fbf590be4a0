// The order flow from TypeScript over gRPC (HTTP/2, the servers' own
// protocol): messages and service descriptors generated from proto/ by
// protoc-gen-es (tests/clients/generate typescript-grpc), calls by Connect's
// gRPC transport for Node.js.
//
//   tests/clients/example typescript-grpc [HOST:PORT]   (default 127.0.0.1:50051)
//
// Needs the read side (eventfold dev with PostgreSQL). Every answer is
// checked; the first surprise ends the run with exit status 1.

import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

import { equals, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { EventStoreService } from "./gen/eventfold/eventstore/v1/eventstore_pb.js";
import { InventoryCommandService } from "./gen/eventfold/inventory/v1/inventory_pb.js";
import {
  CreateOrderRequestSchema,
  CreateOrderResponseSchema,
  OrderCommandService,
} from "./gen/eventfold/orders/v1/orders_pb.js";
import { OrderQueryService, OrderStatus } from "./gen/eventfold/query/v1/query_pb.js";
import { SagaService, SagaStatus, type Saga } from "./gen/eventfold/sagas/v1/sagas_pb.js";

// Every call gets a deadline; watching a saga gets longer.
const TIMEOUT_MS = 10_000;
const SAGA_TIMEOUT_MS = 60_000;

function check(condition: boolean, what: string): asserts condition {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

const target = process.argv[2] ?? "127.0.0.1:50051";
const transport = createGrpcTransport({ baseUrl: `http://${target}` });
const inventory = createClient(InventoryCommandService, transport);
const orders = createClient(OrderCommandService, transport);
const sagas = createClient(SagaService, transport);
const queries = createClient(OrderQueryService, transport);
const store = createClient(EventStoreService, transport);

type CreateOrder = MessageInitShape<typeof CreateOrderRequestSchema>;

/** CreateOrder's request for two kettles at 12.50 EUR, paid with `token`. */
function orderRequest(orderId: string, productId: string, token: string): CreateOrder {
  return {
    requestId: `create-${orderId}`,
    orderId,
    customerId: "c-typescript-grpc",
    currency: "EUR",
    paymentToken: token,
    carrier: "DHL",
    items: [{ productId, quantity: 2, unitPrice: { minor: 1250n, currency: "EUR" } }],
  };
}

/**
 * Follows WatchSaga to its end; the saga's last state. The saga starts a
 * moment after its order: until then WatchSaga answers NOT_FOUND, so that
 * answer is retried.
 */
async function watchSaga(client: Client<typeof SagaService>, sagaId: string): Promise<Saga> {
  const deadline = Date.now() + SAGA_TIMEOUT_MS;
  for (;;) {
    let last: Saga | undefined;
    try {
      for await (const message of client.watchSaga({ sagaId }, { timeoutMs: deadline - Date.now() })) {
        last = message.saga;
        const step = last?.currentStep ? ` at ${last.currentStep}` : "";
        if (last) console.log(`  saga ${sagaId}: ${SagaStatus[last.status]}${step}`);
      }
      check(last !== undefined, `WatchSaga(${sagaId}) sent nothing`);
      return last;
    } catch (error) {
      const refusal = ConnectError.from(error);
      if (refusal.code !== Code.NotFound || Date.now() > deadline) throw refusal;
      await sleep(200);
    }
  }
}

const run = randomUUID().slice(0, 8);
const productId = `kettle-${run}`;
const paid = `ts-${run}`;
const declined = `ts-${run}-declined`;

// 1. A product and its stock.
await inventory.registerProduct({ productId, name: "Kettle" }, { timeoutMs: TIMEOUT_MS });
await inventory.replenishStock({ productId, quantity: 10 }, { timeoutMs: TIMEOUT_MS });
console.log(`product ${productId}: registered, 10 in stock`);

// 2. An order with a payment token and a request id; its total is computed
// by the server. 64-bit integers are bigint.
const request = orderRequest(paid, productId, "tok_visa");
const created = await orders.createOrder(request, { timeoutMs: TIMEOUT_MS });
const position = created.result?.globalPosition ?? 0n;
console.log(`order ${paid}: total ${created.total?.minor} ${created.total?.currency}, global position ${position}`);
check(created.total?.minor === 2500n && created.total.currency === "EUR", `total ${created.total?.minor}`);
check(position > 0n, "the write's position");

// 3. The same request again (a retry after a lost answer): the first answer,
// nothing appended twice.
const retried = await orders.createOrder(request, { timeoutMs: TIMEOUT_MS });
check(equals(CreateOrderResponseSchema, retried, created), "the retry's answer is the first one");
console.log("retry with the same request id: the identical answer");

// 4. The fulfilment saga, watched to its end.
let saga = await watchSaga(sagas, `fulfil-${paid}`);
check(saga.status === SagaStatus.COMPLETED, `saga ${SagaStatus[saga.status]} (${saga.reason})`);
console.log(`saga fulfil-${paid}: ${SagaStatus[saga.status]}`);

// 5. Read your write: the read model waits for the command's position.
const { order: view } = await queries.getOrder({ orderId: paid, minPosition: position }, { timeoutMs: TIMEOUT_MS });
check(view?.orderId === paid && view.total?.minor === 2500n, `read model ${view?.orderId}`);
check(view.lastPosition >= position, `read model at ${view.lastPosition}, behind ${position}`);
console.log(
  `read model (minPosition ${position}): ${OrderStatus[view.status]}, total ${view.total.minor} ${view.total.currency}`,
);

// 6. The order's events, as the event store keeps them.
const { events } = await store.readStream({ streamId: `order-${paid}` }, { timeoutMs: TIMEOUT_MS });
const types = events.map((event) => event.eventType);
check(types[0] === "OrderCreated" && types.length > 1, `order stream ${types.join(", ")}`);
console.log(`order stream order-${paid}: ${types.join(", ")}`);

// 7. A declined card: the saga fails and says why.
await orders.createOrder(orderRequest(declined, productId, "tok_decline"), { timeoutMs: TIMEOUT_MS });
saga = await watchSaga(sagas, `fulfil-${declined}`);
check(saga.status === SagaStatus.FAILED && saga.reason === "PAYMENT_DECLINED", `saga ${SagaStatus[saga.status]}`);
console.log(`saga fulfil-${declined}: ${SagaStatus[saga.status]} (${saga.reason})`);

// 8. A refused command: the code, the ErrorInfo reason and the BadRequest
// field that says what to fix.
const bad: CreateOrder = {
  orderId: `ts-${run}-empty`,
  customerId: "c-typescript-grpc",
  currency: "EUR",
  items: [{ productId, quantity: 0, unitPrice: { minor: 1250n, currency: "EUR" } }],
};
let refusal: ConnectError | undefined;
try {
  await orders.createOrder(bad, { timeoutMs: TIMEOUT_MS });
} catch (error) {
  refusal = ConnectError.from(error);
}
check(refusal !== undefined, "an order without a quantity was accepted");
const [info] = refusal.findDetails(ErrorInfoSchema);
const [badRequest] = refusal.findDetails(BadRequestSchema);
const fields = badRequest?.fieldViolations.map((violation) => violation.field) ?? [];
check(refusal.code === Code.InvalidArgument, `code ${Code[refusal.code]}`);
check(info?.reason === "INVALID_ARGUMENT", `reason ${info?.reason}`);
check(fields.length === 1 && fields[0] === "items[0].quantity", `fields ${fields.join(", ")}`);
console.log(
  `refused: ${Code[refusal.code]}, reason ${info.reason}, field ${fields[0]} ` +
    `(${badRequest?.fieldViolations[0]?.description})`,
);

console.log("typescript-grpc example: every check passed");
