"""The gRPC service (``relay serve``): a thin servicer converting ``relay.v1`` messages to
engine requests and engine events to streamed ``GenerateEvent`` messages.

Nothing here yet: see the gRPC service issue. The engine already exposes what the servicer will
call: request validation naming the field, step events, resumable denoise state.
"""
