/**
 * The client's errors: one class per gRPC status, all extending `DispatchError`.
 *
 * ```ts
 * try {
 *   await client.getConversation("conv_x");
 * } catch (err) {
 *   if (err instanceof NotFoundError) ...;
 *   else if (err instanceof DispatchError) console.log(err.codeName, err.details);
 * }
 * ```
 *
 * This module imports nothing: the Node and the browser entry points share it.
 */

/** gRPC status codes, by name (the numbers are gRPC's). */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;

export type CodeName = keyof typeof Code;

const NAMES: Record<number, CodeName> = Object.fromEntries(
  Object.entries(Code).map(([name, number]) => [number, name as CodeName]),
);

/** The name of a status code (`5` → `"NOT_FOUND"`); `"UNKNOWN"` for a number gRPC does not define. */
export function codeName(code: number): CodeName {
  return NAMES[code] ?? "UNKNOWN";
}

/**
 * A call failed: `code` is the gRPC status (a number, see `Code`), `codeName` its name,
 * `details` the server's message. `String(err)` reads `NOT_FOUND: conversation … not found`.
 */
export class DispatchError extends Error {
  readonly code: number;
  readonly codeName: string;
  readonly details: string;

  constructor(code: number, details = "", name?: string) {
    const label = name ?? codeName(code);
    super(details ? `${label}: ${details}` : label);
    this.name = new.target.name;
    this.code = code;
    this.codeName = label;
    this.details = details;
  }
}

/** Each subclass fixes its status; construct it with the details only. */
function statusClass<N extends CodeName>(codeName: N) {
  return class extends DispatchError {
    static readonly CODE = Code[codeName];
    constructor(details = "") {
      super(Code[codeName], details);
    }
  };
}

export class CancelledError extends statusClass("CANCELLED") {}
export class UnknownError extends statusClass("UNKNOWN") {}
export class InvalidArgumentError extends statusClass("INVALID_ARGUMENT") {}
export class DeadlineExceededError extends statusClass("DEADLINE_EXCEEDED") {}
export class NotFoundError extends statusClass("NOT_FOUND") {}
export class AlreadyExistsError extends statusClass("ALREADY_EXISTS") {}
export class PermissionDeniedError extends statusClass("PERMISSION_DENIED") {}
export class ResourceExhaustedError extends statusClass("RESOURCE_EXHAUSTED") {}
export class FailedPreconditionError extends statusClass("FAILED_PRECONDITION") {}
export class AbortedError extends statusClass("ABORTED") {}
export class UnimplementedError extends statusClass("UNIMPLEMENTED") {}
export class InternalError extends statusClass("INTERNAL") {}
export class UnavailableError extends statusClass("UNAVAILABLE") {}
export class UnauthenticatedError extends statusClass("UNAUTHENTICATED") {}

const BY_CODE: Record<number, new (details?: string) => DispatchError> = {
  [Code.CANCELLED]: CancelledError,
  [Code.UNKNOWN]: UnknownError,
  [Code.INVALID_ARGUMENT]: InvalidArgumentError,
  [Code.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Code.NOT_FOUND]: NotFoundError,
  [Code.ALREADY_EXISTS]: AlreadyExistsError,
  [Code.PERMISSION_DENIED]: PermissionDeniedError,
  [Code.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Code.FAILED_PRECONDITION]: FailedPreconditionError,
  [Code.ABORTED]: AbortedError,
  [Code.UNIMPLEMENTED]: UnimplementedError,
  [Code.INTERNAL]: InternalError,
  [Code.UNAVAILABLE]: UnavailableError,
  [Code.UNAUTHENTICATED]: UnauthenticatedError,
};

/** The most specific `DispatchError` for `code`. */
export function errorFor(code: number, details = ""): DispatchError {
  const cls = BY_CODE[code];
  return cls ? new cls(details) : new DispatchError(code, details);
}

/**
 * The error for a status given by name, as the HTTP bridge answers
 * (`{"error": {"code": "NOT_FOUND", "message": ...}}`). A name that is no gRPC status
 * (the bridge's own `METHOD_NOT_ALLOWED`) is a `DispatchError` with code UNKNOWN that
 * keeps the name.
 */
export function errorForName(name: string, details = ""): DispatchError {
  const code = (Code as Record<string, number>)[name];
  return code === undefined ? new DispatchError(Code.UNKNOWN, details, name) : errorFor(code, details);
}
