// Package conformance runs the conformance scenario (tests/conformance/scenario.json; its
// format is tests/conformance/README.md) with the Go client against a running stack:
//
//	DISPATCH_CONFORMANCE_SCENARIO=... DISPATCH_ADDRESS=... DISPATCH_API_KEY=... \
//	DISPATCH_CONFORMANCE_OTHER_KEY=... go test ./conformance/...
//
// Each case is a subtest named by the case. Without that environment the test is skipped;
// tests/conformance/test_go.py starts the stack and runs it.
package conformance
