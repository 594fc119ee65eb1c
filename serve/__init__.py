"""The gRPC service (``relay serve``): a thin servicer converting ``relay.v1`` messages to
engine requests and engine events to streamed ``GenerateEvent`` messages (:mod:`serve.convert`,
:mod:`serve.server`), token auth and TLS (:mod:`serve.auth`), the Python client
(:mod:`serve.client`), the stub generator (:mod:`serve.codegen`) and the app that ties a server
to the models' runners (:mod:`serve.app`)."""
