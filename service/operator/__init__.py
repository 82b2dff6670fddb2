"""The operator API: admin routes, explain, the OpenAPI document and its models."""
