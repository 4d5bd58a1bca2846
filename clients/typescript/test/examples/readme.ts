// The README's examples, compiled with the package (tsc checks them; nothing runs them).
import { DispatchClient, FailedPreconditionError } from "../../src/index.js";
import { BrowserDispatchClient } from "../../src/browser/index.js";

export async function opening(): Promise<void> {
  const client = new DispatchClient(); // DISPATCH_ADDRESS and DISPATCH_API_KEY, or .dispatch/api_key
  const conversation = await client.createConversation({ title: "demo" });
  for await (const event of client.runTurn(conversation.id, "what is in this workspace?")) {
    if (event.kind?.$case === "textDelta") process.stdout.write(event.kind.value.text);
    if (event.kind?.$case === "toolCall") console.log(`\n→ ${event.kind.value.name}`);
  }
  client.close();
}

export async function errors(client: DispatchClient, id: string): Promise<void> {
  try {
    await client.send(id, "again", { policy: "reject" });
  } catch (err) {
    if (err instanceof FailedPreconditionError) console.log("a turn is running:", err.details);
    else throw err;
  }
}

export async function browser(output: { append(text: string): void }): Promise<void> {
  const client = new BrowserDispatchClient({
    baseUrl: "https://dispatch.example.com:7610", // the HTTP bridge (default: the page's origin)
    getAuthorization: async () => (await fetch("/my-app/dispatch-key")).text(), // or apiKey: "..."
  });
  const conversation = await client.createConversation();
  for await (const event of client.runTurn(conversation.id, "hello")) {
    if (event.kind?.$case === "textDelta") output.append(event.kind.value.text);
  }
}
