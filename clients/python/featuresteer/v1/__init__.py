"""Generated stubs for featuresteer.v1 (from proto/featuresteer/v1; never edit by hand —
run `make protos`; `make test` fails when they differ from the proto)."""
