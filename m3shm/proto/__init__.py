"""Generated protobuf modules (protoc from proto/); do not edit by hand."""
