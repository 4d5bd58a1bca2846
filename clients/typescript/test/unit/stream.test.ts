// Resume and TurnFollower on their own: the reconnect decisions and the turn's events.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  AgentEvent,
  Code,
  DeadlineExceededError,
  errorFor,
  NotFoundError,
  Resume,
  SendResponse,
  SubscribeUntil,
  TurnFollower,
  TurnState,
  UnavailableError,
} from "../../src/index.js";

const event = (seq: number, kind: AgentEvent["kind"], turnId = "t1"): AgentEvent => ({
  conversationId: "c",
  turnId,
  eventSeq: seq,
  stepId: "",
  time: undefined,
  kind,
});
const text = (seq: number, t = "x", turnId = "t1") => event(seq, { $case: "textDelta", value: { text: t } }, turnId);

describe("Resume", () => {
  it("asks from its cursor and yields each event once", () => {
    const resume = new Resume("c", { afterEventSeq: 2 });
    assert.deepEqual(resume.request(), {
      conversationId: "c",
      afterEventSeq: 2,
      until: SubscribeUntil.SUBSCRIBE_UNTIL_FOLLOW,
    });
    const fresh = resume.accept([text(1), text(2), text(3), text(4)]);
    assert.deepEqual(
      fresh.map((e) => e.eventSeq),
      [3, 4],
    );
    assert.deepEqual(
      resume.accept([text(4), text(5)]).map((e) => e.eventSeq),
      [5],
    );
    assert.equal(resume.request().afterEventSeq, 5);
  });

  it("backs off exponentially on failures in a row, up to the cap, and starts over after progress", () => {
    const resume = new Resume("c", { initialBackoffMs: 100, maxBackoffMs: 500 });
    const delays = [1, 2, 3, 4, 5].map(() => resume.broke(new UnavailableError("down")));
    assert.deepEqual(delays, [100, 200, 400, 500, 500]);
    resume.request();
    resume.accept([text(1)]);
    assert.equal(resume.broke(new UnavailableError("down")), 100);
  });

  it("resumes on the statuses of a dropped stream and throws any other at once", () => {
    for (const code of [Code.UNAVAILABLE, Code.INTERNAL, Code.UNKNOWN, Code.RESOURCE_EXHAUSTED, Code.ABORTED]) {
      assert.equal(typeof new Resume("c").broke(errorFor(code, "")), "number");
    }
    assert.throws(() => new Resume("c").broke(new NotFoundError("gone")), NotFoundError);
    assert.throws(() => new Resume("c").broke(new DeadlineExceededError("late")), DeadlineExceededError);
    assert.throws(() => new Resume("c", { reconnect: false }).broke(new UnavailableError("down")), UnavailableError);
  });

  it("resubscribes at once after a resync that brought events", () => {
    const resume = new Resume("c");
    resume.request();
    resume.accept([text(1)], 1);
    assert.equal(resume.resync, true);
    assert.equal(resume.ended(), 0);
    assert.equal(resume.request().afterEventSeq, 1);
    assert.equal(resume.resync, false);
  });

  it("ends a bounded stream that ends with OK; resumes a follow stream that ends", () => {
    const bounded = new Resume("c", { until: "turn_sealed" });
    assert.equal(bounded.until, SubscribeUntil.SUBSCRIBE_UNTIL_TURN_SEALED);
    assert.equal(bounded.ended(), null);
    assert.equal(bounded.nextDelay(), null);
    const follow = new Resume("c");
    assert.equal(typeof follow.ended(), "number");
  });

  it("gives up after maxReconnects, with the last status", () => {
    const resume = new Resume("c", { maxReconnects: 2 });
    resume.broke(new UnavailableError("down"));
    resume.broke(new UnavailableError("down"));
    assert.throws(
      () => resume.broke(new UnavailableError("down")),
      (err: unknown) => err instanceof UnavailableError && /gave up after 2 reconnects/.test(err.details),
    );
  });

  it("refuses a cursor that is no event_seq and an unknown until", () => {
    assert.throws(() => new Resume("c", { afterEventSeq: Number.NaN }), TypeError);
    assert.throws(() => new Resume("c", { afterEventSeq: -1 }), TypeError);
    assert.throws(() => new Resume("c", { until: "never" }), TypeError);
  });
});

describe("TurnFollower", () => {
  const sent = (over: Partial<SendResponse> = {}): SendResponse => ({
    turnId: "t1",
    state: TurnState.TURN_STATE_RUNNING,
    queued: false,
    afterEventSeq: 0,
    ...over,
  });
  const started = (seq: number, turnId: string) =>
    event(seq, { $case: "turnStarted", value: {} } as unknown as AgentEvent["kind"], turnId);
  const sealed = (seq: number, turnId: string) =>
    event(seq, { $case: "turnSealed", value: {} } as unknown as AgentEvent["kind"], turnId);

  it("yields its turn's events up to the seal", () => {
    const follower = new TurnFollower("c", sent());
    assert.equal(follower.accept(started(1, "t1")), true);
    assert.equal(follower.accept(text(2, "a", "t0")), false);
    assert.equal(follower.accept(text(3)), true);
    assert.equal(follower.done, false);
    assert.equal(follower.accept(sealed(4, "t1")), true);
    assert.equal(follower.done, true);
    assert.equal(follower.accept(text(5)), false);
  });

  it("follows a queued message into the next turn unless the running one took it as steering", () => {
    const follower = new TurnFollower("c", sent({ queued: true }));
    follower.accept(text(1));
    follower.accept(sealed(2, "t1"));
    assert.equal(follower.done, false);
    assert.equal(follower.accept(text(3, "late", "t9")), false);
    assert.equal(follower.accept(started(4, "t2")), true);
    assert.equal(follower.turnId, "t2");
    follower.accept(sealed(5, "t2"));
    assert.equal(follower.done, true);

    const steered = new TurnFollower("c", sent({ queued: true }));
    steered.accept(event(1, { $case: "steeringInjected", value: {} } as unknown as AgentEvent["kind"]));
    steered.accept(sealed(2, "t1"));
    assert.equal(steered.done, true);
  });
});
