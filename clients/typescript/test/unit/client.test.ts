// The Node client against a grpc-js server started here, speaking dispatch.v1.Dispatch:
// how it sends the key and deadlines, maps statuses to error classes, and how subscribe
// resumes after a broken stream and a resync with no gap and no repeat. (The real server
// is exercised by the conformance scenario, tests/conformance/test_typescript.py.)
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import * as grpc from "@grpc/grpc-js";

import {
  AgentEvent,
  Code,
  Conversation,
  DeadlineExceededError,
  DispatchError,
  DispatchClient,
  NotFoundError,
  PublicGetConversationRequest,
  SubscribeRequest,
  SubscribeResponse,
  SubscribeUntil,
  UnauthenticatedError,
  PermissionDeniedError,
} from "../../src/index.js";
import { DispatchDefinition } from "../../src/gen/dispatch/v1/transport.js";

type Fns<T> = { encode(m: T): { finish(): Uint8Array }; decode(b: Uint8Array): T };

/** A grpc-js service definition of some of Dispatch's methods, from the generated one. */
function definition(names: (keyof typeof DispatchDefinition.methods)[]): grpc.ServiceDefinition {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const name of names) {
    const m = DispatchDefinition.methods[name];
    const req = m.requestType as unknown as Fns<unknown>;
    const res = m.responseType as unknown as Fns<unknown>;
    out[name] = {
      path: `/${DispatchDefinition.fullName}/${m.name}`,
      requestStream: false,
      responseStream: m.responseStream,
      requestSerialize: (v: unknown) => Buffer.from(req.encode(v).finish()),
      requestDeserialize: (b: Buffer) => req.decode(b),
      responseSerialize: (v: unknown) => Buffer.from(res.encode(v).finish()),
      responseDeserialize: (b: Buffer) => res.decode(b),
    };
  }
  return out;
}

const KEY = "test-key-not-a-secret";
const EVENTS = Array.from({ length: 10 }, (_, i) =>
  AgentEvent.fromPartial({ conversationId: "conv_1", turnId: "t1", eventSeq: i + 1, kind: { $case: "textDelta", value: { text: `${i + 1} ` } } }),
);

describe("DispatchClient against a grpc-js server", () => {
  let server: grpc.Server;
  let address = "";
  const subscribes: SubscribeRequest[] = [];
  const authorizations: string[] = [];

  before(async () => {
    server = new grpc.Server();
    server.addService(definition(["getConversation", "subscribe", "listWorkspaces", "models"]), {
      getConversation(call: grpc.ServerUnaryCall<PublicGetConversationRequest, Conversation>, done: grpc.sendUnaryData<Conversation>) {
        authorizations.push(String(call.metadata.get("authorization")[0] ?? ""));
        if (call.metadata.get("authorization")[0] !== `Bearer ${KEY}`) {
          done({ code: grpc.status.UNAUTHENTICATED, details: "invalid API key" });
        } else if (call.request.conversationId !== "conv_1") {
          done({ code: grpc.status.NOT_FOUND, details: `conversation ${call.request.conversationId} not found` });
        } else {
          done(null, Conversation.fromPartial({ id: "conv_1", title: "one" }));
        }
      },
      listWorkspaces(_call: unknown, done: grpc.sendUnaryData<unknown>) {
        done({ code: grpc.status.PERMISSION_DENIED, details: "no" });
      },
      models() {
        // Never answers: the client's deadline ends the call.
      },
      subscribe(call: grpc.ServerWritableStream<SubscribeRequest, SubscribeResponse>) {
        if (call.request.conversationId !== "conv_1") {
          // Every event, then the live tail, which stays quiet.
          call.write(SubscribeResponse.fromPartial({ events: EVENTS }));
          return;
        }
        subscribes.push(call.request);
        const from = call.request.afterEventSeq;
        const attempt = subscribes.length;
        if (attempt === 1) {
          // Three events, then the connection "breaks".
          call.write(SubscribeResponse.fromPartial({ events: EVENTS.slice(from, from + 3) }));
          setImmediate(() => call.emit("error", { code: grpc.status.UNAVAILABLE, details: "server going away" }));
        } else if (attempt === 2) {
          // Two more, then a resync: the subscriber fell behind.
          call.write(SubscribeResponse.fromPartial({ events: EVENTS.slice(from, from + 2), resync: { afterEventSeq: from + 2 } }));
          call.end();
        } else {
          // The rest, repeating one it already had; the stream ends caught up.
          call.write(SubscribeResponse.fromPartial({ events: EVENTS.slice(from - 1) }));
          call.end();
        }
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    address = `127.0.0.1:${port}`;
  });

  after(() => server.forceShutdown());

  it("sends the key as a bearer token and answers messages", async () => {
    const client = new DispatchClient({ address, apiKey: KEY });
    try {
      const conv = await client.getConversation("conv_1");
      assert.equal(conv.title, "one");
      assert.equal(authorizations.at(-1), `Bearer ${KEY}`);
    } finally {
      client.close();
    }
  });

  it("throws the error class of each status", async () => {
    const client = new DispatchClient({ address, apiKey: KEY });
    const stranger = new DispatchClient({ address, apiKey: "wrong" });
    try {
      await assert.rejects(client.getConversation("conv_2"), (err: unknown) => {
        assert.ok(err instanceof NotFoundError);
        assert.equal(err.code, Code.NOT_FOUND);
        assert.equal(err.details, "conversation conv_2 not found");
        return true;
      });
      await assert.rejects(stranger.getConversation("conv_1"), UnauthenticatedError);
      await assert.rejects(client.listWorkspaces(), PermissionDeniedError);
    } finally {
      client.close();
      stranger.close();
    }
  });

  it("puts a deadline on every unary call, and a signal cancels one", async () => {
    const client = new DispatchClient({ address, apiKey: KEY, timeoutMs: 200 });
    try {
      await assert.rejects(client.models(), DeadlineExceededError);
      const controller = new AbortController();
      const call = client.models({ timeoutMs: 60_000, signal: controller.signal });
      controller.abort(new Error("stop"));
      await assert.rejects(call, /stop/);
    } finally {
      client.close();
    }
  });

  it("has a method for every RPC of the service", () => {
    const client = new DispatchClient({ address, apiKey: KEY });
    try {
      for (const name of Object.keys(DispatchDefinition.methods)) {
        assert.equal(typeof (client as unknown as Record<string, unknown>)[name], "function", name);
      }
    } finally {
      client.close();
    }
  });

  it("ends a subscription when its signal aborts, and close() ends the calls in flight", async () => {
    const client = new DispatchClient({ address, apiKey: KEY });
    const controller = new AbortController();
    const seen: number[] = [];
    await assert.rejects(
      (async () => {
        for await (const event of client.subscribe("conv_quiet", { signal: controller.signal, timeoutMs: 20_000, initialBackoffMs: 1 })) {
          seen.push(event.eventSeq);
          if (seen.length === 2) controller.abort(new Error("enough"));
        }
      })(),
      /enough/,
    );
    assert.deepEqual(seen.slice(0, 2), [1, 2]);
    const pending = client.models({ timeoutMs: 20_000 });
    client.close();
    await assert.rejects(pending, (err: unknown) => err instanceof DispatchError && err.code === Code.CANCELLED);
  });

  it("resumes a broken stream and a resync from its last event, with no gap and no repeat", async () => {
    const client = new DispatchClient({ address, apiKey: KEY });
    const logged: string[] = [];
    try {
      const seen: number[] = [];
      for await (const event of client.subscribe("conv_1", {
        until: "caught_up",
        timeoutMs: 20_000,
        initialBackoffMs: 1,
        log: (_level, message) => logged.push(message),
      })) {
        seen.push(event.eventSeq);
      }
      assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      assert.deepEqual(
        subscribes.map((r) => [r.afterEventSeq, r.until]),
        [
          [0, SubscribeUntil.SUBSCRIBE_UNTIL_CAUGHT_UP],
          [3, SubscribeUntil.SUBSCRIBE_UNTIL_CAUGHT_UP],
          [5, SubscribeUntil.SUBSCRIBE_UNTIL_CAUGHT_UP],
        ],
      );
      assert.ok(logged.some((m) => m.includes("broke")) && logged.some((m) => m.includes("resync")), logged.join("\n"));
      assert.ok(!logged.some((m) => m.includes(KEY)));
    } finally {
      client.close();
    }
  });
});
