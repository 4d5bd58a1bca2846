/**
 * The messages of the public API (generated from proto/dispatch/v1 by ts-proto) and the
 * small conversions the methods take: enum values from short names, an event's kind.
 * Imports nothing from Node or grpc-js: both entry points share it.
 */
import {
  AgentEvent,
  ApprovalDecision,
  PermissionAction,
  PermissionRule,
  SendPolicy,
  SubscribeUntil,
  TurnState,
} from "./gen/dispatch/v1/common.js";

export * from "./gen/dispatch/v1/common.js";
export * from "./gen/dispatch/v1/transport.js";

/** `"enqueue"`, `"interrupt"`, `"reject"` (any case, with or without `SEND_POLICY_`), or the enum. */
export type SendPolicyLike = "enqueue" | "interrupt" | "reject" | string | SendPolicy;
/** `"follow"`, `"caught_up"`, `"turn_sealed"` (any case, with or without `SUBSCRIBE_UNTIL_`), or the enum. */
export type UntilLike = "follow" | "caught_up" | "turn_sealed" | string | SubscribeUntil;
/** `"approve"`, `"reject"`, `"edit"`, or the enum. */
export type DecisionLike = "approve" | "reject" | "edit" | string | ApprovalDecision;
/** A turn state's name (`"running"`, `"TURN_STATE_RUNNING"`) or the enum. */
export type TurnStateLike = string | TurnState;
/**
 * Permission rules as the config writes them (`{shell: {"git status*": "allow", "*": "ask"},
 * read_file: "allow"}`), or as `PermissionRule` messages.
 */
export type PermissionsLike =
  | Record<string, string | PermissionAction | Record<string, string | PermissionAction>>
  | PermissionRule[];

type Enum = Record<string, string | number>;

/** `value` as a number of `enumType`: a name with or without `prefix`, any case, or a number. */
function enumValue(enumType: Enum, prefix: string, value: string | number, what: string): number {
  const numbers = new Map<string, number>();
  for (const [name, number] of Object.entries(enumType)) {
    if (typeof number === "number" && number > 0 && name.startsWith(prefix)) {
      numbers.set(name.slice(prefix.length).toLowerCase(), number);
    }
  }
  if (typeof value === "number") {
    if ([...numbers.values()].includes(value)) return value;
  } else if (typeof value === "string") {
    let key = value.trim().toLowerCase();
    if (key.startsWith(prefix.toLowerCase())) key = key.slice(prefix.length);
    const found = numbers.get(key);
    if (found !== undefined) return found;
  }
  throw new TypeError(`unknown ${what} ${JSON.stringify(value)}: expected one of ${[...numbers.keys()].join("|")}`);
}

export function sendPolicy(value: SendPolicyLike): SendPolicy {
  return enumValue(SendPolicy, "SEND_POLICY_", value, "send policy");
}

export function subscribeUntil(value: UntilLike): SubscribeUntil {
  return enumValue(SubscribeUntil, "SUBSCRIBE_UNTIL_", value, "until");
}

export function approvalDecision(value: DecisionLike): ApprovalDecision {
  return enumValue(ApprovalDecision, "APPROVAL_DECISION_", value, "approval decision");
}

export function turnState(value: TurnStateLike): TurnState {
  return enumValue(TurnState, "TURN_STATE_", value, "turn state");
}

/** One state or several; a lone string is one state. */
export function turnStates(states: TurnStateLike | TurnStateLike[] | undefined): TurnState[] {
  if (states === undefined) return [];
  return Array.isArray(states) ? states.map(turnState) : [turnState(states)];
}

function permissionAction(value: unknown, where: string): PermissionAction {
  if (typeof value !== "string" && typeof value !== "number") {
    throw new TypeError(`${where}: expected allow, ask or deny, or a table of pattern: action`);
  }
  try {
    return enumValue(PermissionAction, "PERMISSION_ACTION_", value, "permission action");
  } catch (err) {
    throw new TypeError(`${where}: ${(err as Error).message}`);
  }
}

/**
 * `permissions` as `PermissionRule` messages, in order: `tool: action` (every call), or
 * `tool: {pattern: action}` where the pattern `"*"` means every call (an empty pattern).
 */
export function permissionRules(permissions: PermissionsLike | undefined): PermissionRule[] {
  if (permissions === undefined) return [];
  if (Array.isArray(permissions)) return permissions.map((r) => PermissionRule.fromPartial(r));
  const rules: PermissionRule[] = [];
  for (const [tool, value] of Object.entries(permissions)) {
    if (typeof value === "object" && value !== null) {
      for (const [pattern, action] of Object.entries(value)) {
        rules.push({
          tool,
          pattern: pattern === "*" ? "" : pattern,
          action: permissionAction(action, `permissions: ${tool} ${JSON.stringify(pattern)}`),
        });
      }
    } else {
      rules.push({ tool, pattern: "", action: permissionAction(value, `permissions: ${tool}`) });
    }
  }
  return rules;
}

/** A tool's input as JSON text: an object is encoded, a string is taken as it is. */
export function inputJson(value: string | Record<string, unknown>): string {
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** The `$case` of an event's kind (`"textDelta"`, `"turnSealed"`, ...), `undefined` for none. */
export type EventKind = NonNullable<AgentEvent["kind"]>["$case"];

/** The proto name of an event's kind (`"text_delta"`, `"turn_sealed"`), `""` for none. */
export function eventKindName(event: AgentEvent): string {
  const kind = event.kind?.$case;
  return kind ? kind.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`) : "";
}
