"""Model adapters: each turns a `ChatRequest` into a `ChatResponse`."""
