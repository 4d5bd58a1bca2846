/**
 * The conformance scenario's step engine (tests/conformance/README.md), for any client of
 * this package: the Node one (test/conformance.ts) and the browser's (run in Chromium by
 * test/browser/driver.ts). It imports nothing from Node.
 */
import type { DispatchApi } from "../src/api.js";
import { DispatchError } from "../src/errors.js";
import { sleep } from "../src/stream.js";
import {
  AgentEvent,
  Approval,
  CancelResponse,
  Conversation,
  eventKindName,
  HistoryResponse,
  ListApprovalsResponse,
  ListTurnsResponse,
  SendResponse,
  Turn,
} from "../src/types.js";

type Data = Record<string, unknown>;
export type Step = Record<string, unknown> & { op: string };
export interface Case {
  name: string;
  unary: boolean;
  steps: Step[];
}

const DEADLINE_MS = 30_000;
const ENDED = new Set(["TURN_STATE_COMPLETED", "TURN_STATE_FAILED", "TURN_STATE_ABORTED", "TURN_STATE_INTERRUPTED"]);

class StepFailed extends Error {}

function check(ok: boolean, message: () => string): asserts ok {
  if (!ok) throw new StepFailed(message());
}

/** A call ended with a gRPC status: `code` is its name (`NOT_FOUND`). */
class CallFailed extends Error {
  constructor(
    readonly code: string,
    readonly details: string,
  ) {
    super(`${code}: ${details}`);
  }
}

function asData(json: unknown, event?: AgentEvent): Data {
  const data = json as Data;
  if (event) data.__kind = eventKindName(event);
  return data;
}

const camel = (segment: string) => segment.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** Equal, with numbers compared as numbers and a field left out as its default. */
function same(a: unknown, b: unknown): boolean {
  const isDefault = (v: unknown) =>
    v === undefined || v === "" || v === 0 || v === false || (typeof v === "string" && v.endsWith("_UNSPECIFIED"));
  if (a === undefined || b === undefined) return isDefault(a) && isDefault(b);
  const numeric = (v: unknown) => (typeof v === "number" || (typeof v === "string" && /^-?\d+$/.test(v)) ? Number(v) : NaN);
  if (!Number.isNaN(numeric(a)) && !Number.isNaN(numeric(b))) return numeric(a) === numeric(b);
  return JSON.stringify(a) === JSON.stringify(b);
}

const kinds = (events: Data[]) => events.map((e) => String(e.__kind));
const text = (events: Data[]) =>
  events
    .filter((e) => e.__kind === "text_delta")
    .map((e) => String((e.textDelta as Data).text ?? ""))
    .join("");
const summary = (events: Data[]) => JSON.stringify(events.map((e) => [Number(e.eventSeq ?? 0), e.__kind]));

export class Runner {
  private saved: Record<string, unknown> = {};

  constructor(private readonly clients: Record<string, DispatchApi>) {}

  resolve(value: unknown): unknown {
    if (typeof value !== "string" || !value.startsWith("$")) return value;
    const [name, ...path] = value.slice(1).split(".");
    let here: unknown = this.saved[name];
    check(here !== undefined, () => `nothing saved as ${name}`);
    for (const segment of path) {
      if (Array.isArray(here)) {
        if (segment === "count") here = here.length;
        else if (segment === "first") here = here[0];
        else if (segment === "last") here = here.at(-1);
        else if (segment.startsWith("kind:")) here = here.find((e: Data) => e.__kind === segment.slice(5));
        else here = here[Number(segment)];
      } else if (here === undefined || here === null) {
        // A field not set reads as its default; a list's length is then 0.
        here = segment === "count" ? 0 : undefined;
      } else {
        here = (here as Data)[camel(segment)];
      }
    }
    return here;
  }

  arg<T>(step: Step, name: string, fallback: T): T {
    return (name in step ? this.resolve(step[name]) : fallback) as T;
  }

  async run(steps: Step[]): Promise<void> {
    for (const [index, step] of steps.entries()) {
      try {
        await this.step(step);
      } catch (err) {
        if (err instanceof StepFailed) throw new StepFailed(`step ${index} (${step.op}): ${err.message}`);
        throw new Error(`step ${index} (${step.op}): ${err instanceof Error ? err.stack : String(err)}`);
      }
    }
  }

  async step(step: Step): Promise<void> {
    if (step.op === "expect") return this.expect(step);
    let result: unknown;
    try {
      result = await this.call(step);
    } catch (err) {
      if (!(err instanceof CallFailed)) throw err;
      check(step.error === err.code, () => `failed with ${err.code}: ${err.details}`);
      return;
    }
    check(!("error" in step), () => `succeeded; expected ${String(step.error)}`);
    if (typeof step.save === "string") this.saved[step.save] = result;
  }

  async call(step: Step): Promise<unknown> {
    const client = this.clients[(step.as as string | undefined) ?? "local"];
    try {
      return await this.sdkCall(client, step);
    } catch (err) {
      if (err instanceof DispatchError) throw new CallFailed(err.codeName, err.details);
      throw err;
    }
  }

  async sdkCall(client: DispatchApi, step: Step): Promise<unknown> {
    const conv = this.arg(step, "conversation", "");
    switch (step.op) {
      case "create_conversation":
        return asData(
          Conversation.toJSON(await client.createConversation({ agent: String(step.agent), title: String(step.title ?? "") })),
        );
      case "get_conversation":
        return asData(Conversation.toJSON(await client.getConversation(conv)));
      case "send":
        return asData(
          SendResponse.toJSON(
            await client.send(conv, this.arg(step, "text", ""), {
              policy: this.arg(step, "policy", "SEND_POLICY_ENQUEUE"),
              idempotencyKey: this.arg(step, "idempotency_key", ""),
            }),
          ),
        );
      case "subscribe":
        return this.subscribe(client, conv, step);
      case "cancel":
        return asData(CancelResponse.toJSON(await client.cancel(conv, this.arg(step, "turn_id", ""))));
      case "get_turn":
        return asData(Turn.toJSON(await client.getTurn(conv, this.arg(step, "turn_id", ""))));
      case "wait_turn": {
        const deadline = Date.now() + DEADLINE_MS;
        for (;;) {
          const turn = asData(Turn.toJSON(await client.getTurn(conv, this.arg(step, "turn_id", ""))));
          if (ENDED.has(String(turn.state))) return turn;
          check(Date.now() < deadline, () => `turn still ${String(turn.state)} after ${DEADLINE_MS} ms`);
          await sleep(50);
        }
      }
      case "list_turns":
        return asData(ListTurnsResponse.toJSON(await client.listTurns(conv)));
      case "history":
        return asData(HistoryResponse.toJSON(await client.history(conv)));
      case "list_approvals":
        return asData(
          ListApprovalsResponse.toJSON(await client.listApprovals(conv, { pendingOnly: this.arg(step, "pending_only", false) })),
        );
      case "resolve_approval":
        return asData(
          Approval.toJSON(
            await client.resolveApproval(this.arg(step, "approval_id", ""), this.arg(step, "decision", ""), {
              reason: this.arg(step, "reason", ""),
            }),
          ),
        );
      default:
        throw new StepFailed(`unknown op ${JSON.stringify(step.op)}`);
    }
  }

  async subscribe(client: DispatchApi, conv: string, step: Step): Promise<Data[]> {
    const until = this.arg<string | undefined>(step, "until", undefined);
    const events: Data[] = [];
    const stream = client.subscribe(conv, {
      afterEventSeq: Number(this.arg(step, "after_event_seq", 0) ?? 0),
      until: until ?? "follow",
      timeoutMs: DEADLINE_MS,
    });
    for await (const event of stream) {
      events.push(asData(AgentEvent.toJSON(event), event));
      if (events.length === step.stop_after || events.at(-1)!.__kind === step.stop_at) {
        break; // drop the stream, as a lost connection would
      }
    }
    return events;
  }

  expect(step: Step): void {
    if ("value" in step) {
      const value = this.resolve(step.value);
      if ("equals" in step) {
        const other = this.resolve(step.equals);
        check(same(value, other), () => `${String(step.value)} is ${JSON.stringify(value)}, not ${JSON.stringify(other)}`);
      }
      if ("differs" in step) {
        const other = this.resolve(step.differs);
        check(!same(value, other), () => `${String(step.value)} is ${JSON.stringify(value)}, the same as ${String(step.differs)}`);
      }
    }
    if ("events" in step) checkEvents(this.resolve(step.events) as Data[], step);
    if ("joined" in step) {
      const joined = (step.joined as string[]).flatMap((part) => this.resolve(part) as Data[]);
      const whole = this.resolve(step.equals) as Data[];
      check(summary(joined) === summary(whole), () => `joined ${summary(joined)} != ${summary(whole)}`);
      check(text(joined) === text(whole), () => `joined text ${JSON.stringify(text(joined))} != ${JSON.stringify(text(whole))}`);
    }
  }
}

function checkEvents(events: Data[], step: Step): void {
  const seen = kinds(events);
  const list = (name: string) => step[name] as string[];
  if ("count" in step) check(events.length === step.count, () => `${events.length} events: ${seen}`);
  if ("starts_with" in step) {
    check(JSON.stringify(seen.slice(0, list("starts_with").length)) === JSON.stringify(list("starts_with")), () => `starts ${seen}`);
  }
  if ("ends_with" in step) {
    check(JSON.stringify(seen.slice(-list("ends_with").length)) === JSON.stringify(list("ends_with")), () => `ends ${seen}`);
  }
  if ("contains" in step) {
    let at = 0;
    for (const kind of seen) if (kind === list("contains")[at]) at += 1;
    check(at === list("contains").length, () => `${list("contains")} not in order in ${seen}`);
  }
  for (const kind of (step.excludes as string[] | undefined) ?? []) check(!seen.includes(kind), () => `${kind} in ${seen}`);
  if ("text" in step) check(text(events) === step.text, () => `text ${JSON.stringify(text(events))}`);
  if ("consecutive_from" in step) {
    const seqs = events.map((e) => Number(e.eventSeq));
    const first = Number(step.consecutive_from);
    check(
      seqs.every((s, i) => s === first + i),
      () => `event_seqs ${JSON.stringify(seqs)}`,
    );
  }
}

/** Runs each case with fresh clients from `clients()` (one per key: local, other, nobody);
 * `report` hears each case's result as it ends. */
export async function runCases(
  cases: Case[],
  clients: () => Record<string, DispatchApi>,
  report: (result: CaseResult) => void,
): Promise<number> {
  let failed = 0;
  for (const testCase of cases) {
    const made = clients();
    try {
      await new Runner(made).run(testCase.steps);
      report({ case: testCase.name, ok: true });
    } catch (err) {
      failed += 1;
      report({ case: testCase.name, ok: false, error: err instanceof Error ? err.message : String(err) });
    } finally {
      for (const client of Object.values(made)) client.close();
    }
  }
  return failed;
}

export interface CaseResult {
  case: string;
  ok: boolean;
  error?: string;
}
