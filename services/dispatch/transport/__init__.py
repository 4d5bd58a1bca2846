"""The transport: the public API clients talk to. It validates input, scopes
every call to the caller's tenant, and relays to the kernel and the store."""
