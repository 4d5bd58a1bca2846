/** `@dispatch/client`: the Node client of Dispatch (gRPC). The browser's is `@dispatch/client/browser`. */
export {
  DEFAULT_ADDRESS,
  DispatchClient,
  findAddress,
  findApiKey,
  toDispatchError,
  type ClientOptions,
  type TlsOptions,
} from "./client.js";
export {
  DEFAULT_TIMEOUT_MS,
  DispatchApi,
  type CallOptions,
  type FollowOptions,
  type MethodName,
  type PageOptions,
  type RequestOf,
  type ResponseOf,
  type SendOptions,
  type SubscribeOptions,
} from "./api.js";
export * from "./errors.js";
export {
  INITIAL_BACKOFF_MS,
  MAX_BACKOFF_MS,
  RESUMABLE,
  Resume,
  TurnFollower,
  type Logger,
  type ResumeOptions,
} from "./stream.js";
export * from "./types.js";
