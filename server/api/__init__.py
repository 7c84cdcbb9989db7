"""The network fronts over one `AsyncLLM`: gRPC (`grpc_server`), OpenAI-compatible REST
(`http_server`), both sharing validation, admission, metrics and feedback (`frontend`)."""
