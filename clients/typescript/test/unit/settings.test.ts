// Where the client finds its address and key, as the Python SDK does.
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, it } from "node:test";

import { DEFAULT_ADDRESS, DispatchClient, findAddress, findApiKey } from "../../src/index.js";

const saved = { ...process.env };
afterEach(() => {
  for (const name of ["DISPATCH_ADDRESS", "DISPATCH_API_KEY", "DISPATCH_DATA_DIR"]) {
    if (saved[name] === undefined) delete process.env[name];
    else process.env[name] = saved[name];
  }
});

describe("settings", () => {
  it("take the address from the argument, DISPATCH_ADDRESS, or the default", () => {
    delete process.env.DISPATCH_ADDRESS;
    assert.equal(findAddress(), DEFAULT_ADDRESS);
    process.env.DISPATCH_ADDRESS = " 127.0.0.1:9999 ";
    assert.equal(findAddress(), "127.0.0.1:9999");
    assert.equal(findAddress("127.0.0.1:1"), "127.0.0.1:1");
    const client = new DispatchClient();
    assert.equal(client.address, "127.0.0.1:9999");
    client.close();
  });

  it("take the key from the argument, DISPATCH_API_KEY, or the data directory's api_key file", () => {
    const dir = mkdtempSync(join(tmpdir(), "dispatch-ts-"));
    writeFileSync(join(dir, "api_key"), "from-the-file\n");
    process.env.DISPATCH_DATA_DIR = dir;
    delete process.env.DISPATCH_API_KEY;
    assert.equal(findApiKey(), "from-the-file");
    process.env.DISPATCH_API_KEY = "from-the-env";
    assert.equal(findApiKey(), "from-the-env");
    assert.equal(findApiKey("given"), "given");
    process.env.DISPATCH_DATA_DIR = join(dir, "missing");
    delete process.env.DISPATCH_API_KEY;
    assert.equal(findApiKey(), "");
  });
});
