// Errors per status and the conversions the methods take.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  approvalDecision,
  ApprovalDecision,
  Code,
  DispatchError,
  errorFor,
  errorForName,
  eventKindName,
  FailedPreconditionError,
  NotFoundError,
  PermissionAction,
  permissionRules,
  sendPolicy,
  SendPolicy,
  toDispatchError,
  turnStates,
  TurnState,
  UnauthenticatedError,
  AgentEvent,
} from "../../src/index.js";

describe("errors", () => {
  it("are one class per status, all DispatchErrors with code and details", () => {
    const err = errorFor(Code.NOT_FOUND, "conversation conv_x not found");
    assert.ok(err instanceof NotFoundError);
    assert.ok(err instanceof DispatchError);
    assert.ok(err instanceof Error);
    assert.equal(err.code, 5);
    assert.equal(err.codeName, "NOT_FOUND");
    assert.equal(err.details, "conversation conv_x not found");
    assert.equal(err.name, "NotFoundError");
    assert.equal(err.message, "NOT_FOUND: conversation conv_x not found");
    assert.ok(new FailedPreconditionError("x") instanceof DispatchError);
    assert.equal(new UnauthenticatedError().code, Code.UNAUTHENTICATED);
  });

  it("come from grpc-js errors and from the HTTP bridge's names", () => {
    assert.ok(toDispatchError({ code: 16, details: "bad key" }) instanceof UnauthenticatedError);
    assert.ok(errorForName("FAILED_PRECONDITION", "busy") instanceof FailedPreconditionError);
    const other = errorForName("METHOD_NOT_ALLOWED", "GET is not allowed");
    assert.equal(other.code, Code.UNKNOWN);
    assert.equal(other.codeName, "METHOD_NOT_ALLOWED");
  });
});

describe("conversions", () => {
  it("take short names in any case, full names and enum values", () => {
    assert.equal(sendPolicy("Reject"), SendPolicy.SEND_POLICY_REJECT);
    assert.equal(sendPolicy("SEND_POLICY_INTERRUPT"), SendPolicy.SEND_POLICY_INTERRUPT);
    assert.equal(sendPolicy(SendPolicy.SEND_POLICY_ENQUEUE), SendPolicy.SEND_POLICY_ENQUEUE);
    assert.throws(() => sendPolicy("later"), /unknown send policy "later": expected one of enqueue\|interrupt\|reject/);
    assert.equal(approvalDecision("edit"), ApprovalDecision.APPROVAL_DECISION_EDIT);
    assert.deepEqual(turnStates("running"), [TurnState.TURN_STATE_RUNNING]);
    assert.deepEqual(turnStates(["queued", "TURN_STATE_COMPLETED"]), [TurnState.TURN_STATE_QUEUED, TurnState.TURN_STATE_COMPLETED]);
  });

  it("read permission rules as the config writes them", () => {
    assert.deepEqual(permissionRules({ shell: { "git status*": "allow", "*": "ask" }, read_file: "allow" }), [
      { tool: "shell", pattern: "git status*", action: PermissionAction.PERMISSION_ACTION_ALLOW },
      { tool: "shell", pattern: "", action: PermissionAction.PERMISSION_ACTION_ASK },
      { tool: "read_file", pattern: "", action: PermissionAction.PERMISSION_ACTION_ALLOW },
    ]);
    assert.throws(() => permissionRules({ shell: "maybe" }), /permissions: shell: unknown permission action/);
  });

  it("name an event's kind as the proto does", () => {
    const event = AgentEvent.fromJSON({ event_seq: "7", turn_sealed: {} });
    assert.equal(event.eventSeq, 7);
    assert.equal(eventKindName(event), "turn_sealed");
    assert.equal(eventKindName(AgentEvent.fromPartial({})), "");
  });
});
