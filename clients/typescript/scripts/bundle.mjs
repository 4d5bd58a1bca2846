// The browser entry point as one ES module a page can import without a bundler:
// dist/browser/dispatch-client.js. Built for the browser platform, so an import of
// grpc-js or of a Node module fails the build instead of reaching a page. The browser
// test's conformance runner is bundled the same way (dist/test/browser/scenario.js).
import { build } from "esbuild";

const bundles = [
  ["src/browser/index.ts", "dist/browser/dispatch-client.js"],
  ["test/browser/scenario-entry.ts", "dist/test/browser/scenario.js"],
];

for (const [entry, outfile] of bundles) await build({
  entryPoints: [entry],
  outfile,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  sourcemap: true,
  legalComments: "none",
  logLevel: "warning",
  external: [],
  // A Node built-in or grpc-js in the browser graph is a bug: refuse it by name.
  plugins: [
    {
      name: "no-node",
      setup(b) {
        b.onResolve({ filter: /^(node:|@grpc\/|fs$|path$|http2?$|net$|tls$)/ }, (args) => ({
          errors: [{ text: `the browser bundle may not import ${args.path} (from ${args.importer})` }],
        }));
      },
    },
  ],
});
