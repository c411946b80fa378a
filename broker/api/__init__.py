"""The gRPC edge: proto <-> domain translation, auth, and the status table."""
